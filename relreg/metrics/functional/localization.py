"""Localization metrics as functions: how well relevance maps agree with foreground masks.

The math lives here once, in ``_x_update`` functions that return per-batch summable statistics;
the public functions and the ``Metric`` classes (:mod:`relreg.metrics.localization`) both use them.
Maps ``(B, h, w)`` or ``(B, H, W)`` are upsampled bilinearly to the masks ``(B, H, W)`` and min-max
normalised per image (:func:`relreg.explain.to_pixels`), except for relevance mass, whose published
definition is a share of the raw map's positive relevance (below).

- relevance mass and relevance rank accuracy: Arras, Osman & Samek, "CLEVR-XAI", Information
  Fusion 2022. Relevance mass accuracy is ``sum_{p in mask} R_p^+ / sum_p R_p^+``, the share of
  the positive relevance inside the mask (``convention="positive"``, the default). Quantus'
  ``RelevanceMassAccuracy`` (``quantus/metrics/localisation/relevance_mass_accuracy.py``) divides
  the map by its largest absolute value first (``normalise_by_max``), which leaves the share
  unchanged, and sums the raw map rather than its positive part, which agrees for the
  non-negative maps of most relreg explainers. ``convention="minmax"`` is relreg's earlier share
  of the min-max normalised map: subtracting each map's minimum changes the share (a uniform
  floor counts as relevance under ``"positive"`` and not under ``"minmax"``);
- pointing game: Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016;
- segmentation agreement (pixel accuracy, mIoU, mAP; maps thresholded at their mean): the
  segmentation test of Chefer, Gur & Wolf, CVPR 2021;
- top-k intersection: the share of the ``k`` most relevant pixels inside the mask (Theiner,
  Müller-Budack & Ewerth, "Interpretable Semantic Photo Geolocation", WACV 2022; Quantus'
  ``quantus/metrics/localisation/top_k_intersection.py``). Quantus takes ``k`` pixels (1000);
  relreg also takes a fraction of the image, so that one setting means the same at any size
  (the registered default, ``1000 / 224**2``, is Quantus' 1000 at 224 px). Ties go to the first
  pixel in row-major order (a stable sort; Quantus' ``np.argsort`` leaves their order open);
- localization AUC: the ROC AUC of the map's pixels as scores for the mask's pixels (Fawcett,
  "An introduction to ROC analysis", Pattern Recognition Letters 2006; Quantus'
  ``quantus/metrics/localisation/auc.py``, which calls scikit-learn's ``roc_curve`` and ``auc``):
  the probability that a foreground pixel outranks a background one, ties counting one half,
  which is what the trapezoids of scikit-learn's curve add up to.

Both leave out images whose mask is empty (Quantus returns NaN for them), the AUC also images
whose mask covers every pixel (no background to rank against).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from relreg.explain.tokens import to_pixels

__all__ = [
    "localization_auc",
    "pointing_game",
    "relevance_mass",
    "relevance_rank_accuracy",
    "relevance_share",
    "segmentation_agreement",
    "top_k_intersection",
]


def _pixels(maps: Tensor, masks: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Validate; return (normalised) pixel maps and float masks, both ``(B, H, W)``."""
    if not isinstance(maps, Tensor) or not isinstance(masks, Tensor):
        raise TypeError(
            "Expected maps and masks to be torch.Tensors, but got "
            f"{type(maps).__name__} and {type(masks).__name__}."
        )
    if maps.ndim != 3 or masks.ndim != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(
            "Expected maps (B, h, w) and masks (B, H, W) with the same B, but got "
            f"{tuple(maps.shape)} and {tuple(masks.shape)}."
        )
    if not torch.isfinite(maps).all():
        raise ValueError("Expected finite maps, but got NaN or Inf values.")
    masks = masks.float()
    if ((masks != 0) & (masks != 1)).any():
        raise ValueError("Expected binary masks with values in {0, 1}.")
    return to_pixels(maps.detach().float(), size=masks.shape[-2:], normalize=normalize), masks


MASS_CONVENTIONS = ("positive", "minmax")


def check_convention(convention: object) -> str:
    """Return ``convention`` if it names a relevance-mass convention, else raise ``ValueError``."""
    if convention not in MASS_CONVENTIONS:
        raise ValueError(
            f"Expected convention to be one of {MASS_CONVENTIONS}, but got {convention!r}."
        )
    return convention  # type: ignore[return-value]


def _relevance_mass_update(
    maps: Tensor, masks: Tensor, convention: str = "positive", eps: float = 1e-12
) -> Tensor:
    """Per-image fraction ``(B,)`` of the relevance inside the mask (:func:`relevance_share`)."""
    check_convention(convention)
    pix, masks = _pixels(maps, masks, normalize=convention == "minmax")
    pix = pix.clamp_min(0)
    return (pix * masks).flatten(1).sum(1) / pix.flatten(1).sum(1).clamp_min(eps)


def relevance_share(maps: Tensor, regions: Tensor, convention: str = "positive") -> Tensor:
    """Per-image share ``(B,)`` of the relevance that falls inside ``regions``.

    The per-sample form of :func:`relevance_mass`, for any binary region (a foreground mask, its
    background ``1 - mask``, a cue's pixels). With ``convention="positive"`` (Arras et al., 2022)
    the share is ``sum_{p in region} R_p^+ / sum_p R_p^+`` of the upsampled raw map (0 for a map
    with no positive relevance); with ``"minmax"`` each map is first min-max normalised to [0, 1].

    Args:
        maps: ``(B, h, w)`` patch-grid or ``(B, H, W)`` pixel maps, upsampled bilinearly to the
            regions.
        regions: ``(B, H, W)`` binary.
        convention: ``"positive"`` (the published definition) or ``"minmax"``.

    Returns:
        ``(B,)`` fractions in [0, 1].

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[1.0, 2.0], [1.0, 4.0]]])
        >>> region = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
        >>> relevance_share(maps, region)  # 4 / (1 + 2 + 1 + 4)
        tensor([0.5000])
        >>> relevance_share(maps, region, convention="minmax")  # 3 / (0 + 1 + 0 + 3)
        tensor([0.7500])
    """
    return _relevance_mass_update(maps, regions, convention)


def _relevance_rank_update(maps: Tensor, masks: Tensor) -> Tensor:
    """Per-image fraction ``(B,)`` of the K most relevant pixels inside the mask, K = mask size."""
    pix, masks = _pixels(maps, masks)
    flat, m = pix.flatten(1), masks.flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranked = m.gather(1, order)
    k = m.sum(1)
    within = torch.arange(flat.shape[1], device=flat.device)[None] < k[:, None]
    return (ranked * within).sum(1) / k.clamp_min(1)


def _pointing_game_update(maps: Tensor, masks: Tensor) -> Tensor:
    """Per-image hit ``(B,)``: 1 if the most relevant pixel lies inside the mask."""
    pix, masks = _pixels(maps, masks)
    top = pix.flatten(1).argmax(dim=1)
    return masks.flatten(1).gather(1, top[:, None])[:, 0]


def _segmentation_update(maps: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """Summable statistics of the segmentation test for a batch.

    Returns ``correct`` and ``total`` pixels, ``intersection`` and ``union`` ``(2,)`` for
    (background, foreground), and ``ap_sum`` / ``ap_count`` over images with a non-empty mask.
    """
    pix, masks = _pixels(maps, masks)
    pred = (pix > pix.flatten(1).mean(1).view(-1, 1, 1)).float()
    correct = (pred == masks).sum()
    inter = torch.stack([((1 - pred) * (1 - masks)).sum(), (pred * masks).sum()])
    union = torch.stack(
        [((1 - pred) + (1 - masks)).clamp(max=1).sum(), (pred + masks).clamp(max=1).sum()]
    )
    ap = _average_precision(pix.flatten(1), masks.flatten(1))
    has_fg = masks.flatten(1).sum(1) > 0
    return {
        "correct": correct,
        "total": torch.tensor(masks.numel(), device=masks.device),
        "intersection": inter,
        "union": union,
        "ap_sum": ap[has_fg].sum(),
        "ap_count": has_fg.sum(),
    }


def _average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision per row ``(B,)`` of scores ``(B, P)`` against binary labels ``(B, P)``.

    ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, ties counted together (the
    definition of scikit-learn's ``average_precision_score``).
    """
    order = scores.argsort(dim=1, descending=True, stable=True)
    s, y = scores.gather(1, order), labels.gather(1, order)
    tp = y.cumsum(1)
    rank = torch.arange(1, s.shape[1] + 1, device=s.device, dtype=tp.dtype)
    closes = torch.ones_like(s, dtype=torch.bool)  # last position of each run of equal scores
    closes[:, :-1] = s[:, 1:] != s[:, :-1]
    tp_at_closes = torch.where(closes, tp, torch.zeros_like(tp))
    before = torch.zeros_like(tp)
    before[:, 1:] = tp_at_closes.cummax(dim=1).values[:, :-1]
    gain = torch.where(closes, tp - before, torch.zeros_like(tp))
    return (gain * tp / rank).sum(1) / y.sum(1).clamp_min(1)


def relevance_mass(maps: Tensor, masks: Tensor, convention: str = "positive") -> Tensor:
    """Mean fraction of relevance inside the masks, in [0, 1] (higher is better).

    Relevance mass accuracy of Arras et al. (2022): per image the share of the positive relevance
    inside the mask, averaged over images. ``convention="minmax"`` takes the share of the min-max
    normalised map instead (relreg's earlier convention); see :func:`relevance_share`.

    Args:
        maps: ``(B, h, w)`` or ``(B, H, W)`` relevance maps.
        masks: ``(B, H, W)`` binary foreground masks.
        convention: ``"positive"`` (default) or ``"minmax"``.

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[0.0, 1.0], [0.0, 3.0]]])
        >>> masks = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
        >>> relevance_mass(maps, masks)
        tensor(1.)
    """
    return _relevance_mass_update(maps, masks, convention).mean()


def relevance_rank_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    """Mean fraction of the K most relevant pixels that lie in the mask, in [0, 1].

    K is the mask's size: the relevance rank accuracy of Arras et al. (2022).
    """
    return _relevance_rank_update(maps, masks).mean()


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Fraction of images whose most relevant pixel lies inside the mask, in [0, 1]."""
    return _pointing_game_update(maps, masks).mean()


def segmentation_agreement(maps: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """Segmentation test of Chefer et al. (CVPR 2021) on one batch.

    Maps are min-max normalised and thresholded at their mean. Returns ``pixel_accuracy`` and
    ``miou`` (mean of background and foreground IoU), accumulated over all pixels, and ``map``,
    the mean over images of the average precision of the soft map; fractions in [0, 1].
    """
    return _segmentation_compute(_segmentation_update(maps, masks))


def _segmentation_compute(s: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        "pixel_accuracy": (s["correct"] / s["total"].clamp_min(1)).float(),
        "miou": (s["intersection"] / s["union"].clamp_min(1)).mean().float(),
        "map": (s["ap_sum"] / s["ap_count"].clamp_min(1)).float(),
    }


def check_top_k(k: object) -> int | float:
    """Return ``k`` if it is an int >= 1 (pixels) or a float in (0, 1] (a share of the pixels)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"Expected k an int >= 1 or a float in (0, 1], but got {k!r}.")
    if (isinstance(k, int) and k < 1) or (isinstance(k, float) and not 0 < k <= 1):
        raise ValueError(f"Expected k an int >= 1 or a float in (0, 1], but got {k!r}.")
    return k


def _top_k_pixels(k: int | float, pixels: int) -> int:
    if isinstance(k, float):
        return max(1, math.ceil(k * pixels - 1e-9))
    if k > pixels:
        raise ValueError(f"Expected k at most the {pixels} pixels of a map, but got {k}.")
    return k


def _top_k_intersection_update(maps: Tensor, masks: Tensor, k: int | float = 1000) -> Tensor:
    """Per-image share ``(B,)`` of the ``k`` most relevant pixels inside the mask; NaN for an
    empty mask."""
    check_top_k(k)
    pix, masks = _pixels(maps, masks, normalize=False)
    flat, m = pix.flatten(1), masks.flatten(1)
    top = _top_k_pixels(k, flat.shape[1])
    order = flat.argsort(dim=1, descending=True, stable=True)[:, :top]
    share = m.gather(1, order).mean(1)
    return torch.where(m.sum(1) > 0, share, torch.full_like(share, float("nan")))


def _localization_auc_update(maps: Tensor, masks: Tensor) -> Tensor:
    """Per-image ROC AUC ``(B,)`` of the pixels as scores for the mask; NaN for a mask that is
    empty or full.

    ``sum over groups of equal scores of pos_g (neg_below_g + neg_g / 2) / (P N)``: batched,
    ties exact.
    """
    pix, masks = _pixels(maps, masks, normalize=False)
    flat, m = pix.flatten(1).double(), masks.flatten(1).double()
    order = flat.argsort(dim=1, stable=True)
    s, y = flat.gather(1, order), m.gather(1, order)
    group = torch.zeros_like(s, dtype=torch.long)
    group[:, 1:] = (s[:, 1:] != s[:, :-1]).long().cumsum(1)
    pos = torch.zeros_like(s).scatter_add_(1, group, y)
    neg = torch.zeros_like(s).scatter_add_(1, group, 1 - y)
    below = neg.cumsum(1) - neg
    p, n = m.sum(1), (1 - m).sum(1)
    auc = (pos * (below + neg / 2)).sum(1) / (p * n).clamp_min(1)
    return torch.where((p > 0) & (n > 0), auc, torch.full_like(auc, float("nan"))).float()


def _finite_mean(scores: Tensor) -> Tensor:
    kept = scores[torch.isfinite(scores)]
    return kept.mean().float() if kept.numel() else torch.tensor(float("nan"))


def top_k_intersection(maps: Tensor, masks: Tensor, k: int | float = 1000) -> Tensor:
    """Mean share of the ``k`` most relevant pixels that lie inside the mask, in [0, 1].

    Args:
        maps: ``(B, h, w)`` or ``(B, H, W)`` relevance maps (upsampled to the masks).
        masks: ``(B, H, W)`` binary foreground masks; images with an empty mask are left out.
        k: pixels (an int, Quantus' convention) or a share of the pixels (a float in (0, 1]).

    Returns:
        A scalar tensor (NaN if every mask is empty).

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[0.9, 0.8], [0.1, 0.0]]])
        >>> masks = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
        >>> top_k_intersection(maps, masks, k=2)
        tensor(0.5000)
    """
    return _finite_mean(_top_k_intersection_update(maps, masks, k))


def localization_auc(maps: Tensor, masks: Tensor) -> Tensor:
    """Mean ROC AUC of the maps' pixels as scores for the masks' pixels, in [0, 1] (0.5: chance).

    Args:
        maps: ``(B, h, w)`` or ``(B, H, W)`` relevance maps (upsampled to the masks).
        masks: ``(B, H, W)`` binary foreground masks; images whose mask is empty or full are
            left out.

    Returns:
        A scalar tensor (NaN if no image is left).

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[0.9, 0.5], [0.5, 0.0]]])
        >>> masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
        >>> localization_auc(maps, masks)  # (1 + 1 + 1 + 0.5) / 4
        tensor(0.8750)
    """
    return _finite_mean(_localization_auc_update(maps, masks))
