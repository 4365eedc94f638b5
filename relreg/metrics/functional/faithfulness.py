"""Faithfulness metrics as functions: remove what a map calls relevant, watch the model.

The math lives here once; :mod:`relreg.metrics.faithfulness` holds the ``Metric`` twins, which
call the same ``_x_update`` / ``_x_compute`` functions and keep their results as summed states.

- :func:`perturbation_auc`: the perturbation test of Chefer, Gur & Wolf, "Transformer
  Interpretability Beyond Attention Visualization", CVPR 2021 (accuracy as the top-p units are
  set to ``fill``; AUC by the trapezoid rule over x = 0, 0.1, ..., 0.9, times 100);
- :func:`deletion_insertion_auc`: RISE deletion / insertion (Petsiuk, Das & Saenko, BMVC 2018):
  mean class probability as the most relevant units are deleted or inserted into a ``fill`` canvas;
- :func:`flipping_area`: AttnLRP's faithfulness measure (Achtibat et al., ICML 2024, after
  Bluecher, Vielhaben & Strodthoff, "Decoupling Pixel Flipping and Occlusion Strategy for
  Consistent XAI Benchmarks", TMLR 2024): the area between the least-relevant-first and the
  most-relevant-first curves of the class *logit* as patches are set to ``fill``;
- :func:`faithfulness_correlation`: Bhatt, Weller & Moura, "Evaluating and Aggregating
  Feature-based Model Explanations", IJCAI 2020: over ``runs`` random subsets of ``subset`` units,
  the Pearson correlation between the relevance a subset holds and the drop of the class logit when
  it is set to ``fill``; higher is better. Quantus (``quantus/metrics/faithfulness/
  faithfulness_correlation.py``: 100 runs, 224 features, the logit) draws its subsets among the
  ``C * H * W`` input values, each channel apart, and fills them with the sample's minimum
  ("black"); relreg draws whole pixels (or patches), fills them as its other perturbation metrics
  do (black under the model's normalisation), takes the subset as a share of the units (the
  registered ``224 / 224**2`` is Quantus' 224 at 224 px, in pixels), and draws each sample's
  subsets from its own generator (:mod:`relreg.metrics.functional.sampling`), so that the result
  does not depend on the batching. An image whose subsets all hold the same relevance, or all move
  the logit alike, has no correlation and is left out (Quantus: NaN).

Each fraction is one batched forward pass over the batch (chunked by ``chunk_size``) under
``torch.no_grad``; only one perturbed copy of the batch exists at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import timm.data
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relreg.explain.tokens import to_pixels
from relreg.metrics.functional.sampling import sample_generators
from relreg.validate import check_positive_int

__all__ = [
    "PAPER_FRACTIONS",
    "black_fill",
    "deletion_insertion_auc",
    "faithfulness_correlation",
    "flipping_area",
    "perturbation_auc",
]

PAPER_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
UNITS = ("pixel", "patch")
TARGET_MODES = ("predicted", "label")


def black_fill(model: nn.Module) -> Tensor:
    """``(C,)`` value of black (0 in [0, 1] space) under the model's mean/std normalisation."""
    config = timm.data.resolve_model_data_config(model)
    mean, std = torch.tensor(config["mean"]), torch.tensor(config["std"])
    return -mean / std


@dataclass(frozen=True)
class _Perturber:
    """How a batch is perturbed and scored: the model, the removal unit and the fill value."""

    model: nn.Module
    unit: str
    fill: Tensor
    target_mode: str
    chunk_size: int
    patch: tuple[int, int]


def _perturber(
    model: nn.Module,
    unit: str = "pixel",
    fill: float | Sequence[float] | Tensor | None = None,
    target_mode: str = "predicted",
    chunk_size: int = 64,
) -> _Perturber:
    """Validate the options shared by the faithfulness metrics."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}.")
    if unit not in UNITS:
        raise ValueError(f"Expected unit 'pixel' or 'patch', but got {unit!r}.")
    if target_mode not in TARGET_MODES:
        raise ValueError(f"Expected target_mode 'label' or 'predicted', but got {target_mode!r}.")
    check_positive_int("chunk_size", chunk_size)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if unit == "patch" and patch is None:
        raise ValueError("Expected a model with patch_embed.patch_size for unit='patch'.")
    fill = black_fill(model) if fill is None else torch.as_tensor(fill, dtype=torch.float32)
    patch = (int(patch[0]), int(patch[1])) if patch is not None else (1, 1)
    return _Perturber(model, unit, fill, target_mode, chunk_size, patch)


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fr = [float(f) for f in fractions]
    if not fr or any(not 0 < f < 1 for f in fr) or fr != sorted(fr):
        raise ValueError(f"Expected increasing fractions in (0, 1), but got {fractions!r}.")
    return fr


def _check_mode(mode: str, choices: tuple[str, str]) -> None:
    if mode not in choices:
        raise ValueError(f"Expected mode {choices[0]!r} or {choices[1]!r}, but got {mode!r}.")


def _unit_scores(maps: Tensor, size: tuple[int, int], unit: str, patch: tuple[int, int]) -> Tensor:
    """Relevance per removable unit, ``(B, U)``: pixels of the image or patches of the grid."""
    if unit == "pixel":
        return to_pixels(maps.detach().float(), size=size, normalize=False).flatten(1)
    grid = (size[0] // patch[0], size[1] // patch[1])
    m = maps.detach().float()
    if tuple(m.shape[-2:]) != grid:  # pixel maps: mean relevance of each patch
        m = F.adaptive_avg_pool2d(to_pixels(m, size=size, normalize=False)[:, None], grid)[:, 0]
    return m.flatten(1)


def _removal_ranks(scores: Tensor, most_relevant_first: bool) -> Tensor:
    """Rank ``(B, U)`` of each unit in the removal order (0 = removed first).

    Ties keep index order.
    """
    order = scores.argsort(dim=1, descending=most_relevant_first, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def _to_pixel_mask(
    removed: Tensor, size: tuple[int, int], unit: str, patch: tuple[int, int]
) -> Tensor:
    """Boolean ``(N, 1, H, W)`` pixel mask from a unit mask ``(N, U)``."""
    n = removed.shape[0]
    if unit == "pixel":
        return removed.view(n, 1, *size)
    grid = (size[0] // patch[0], size[1] // patch[1])
    return removed.view(n, 1, *grid).repeat_interleave(patch[0], 2).repeat_interleave(patch[1], 3)


def _check(p: _Perturber, images: Tensor, maps: Tensor, target: Tensor | None) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(
            f"Expected images (B, C, H, W), but got {getattr(images, 'shape', type(images))}."
        )
    if not isinstance(maps, Tensor) or maps.ndim != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"Expected maps (B, h, w) for {images.shape[0]} images, but got "
            f"{getattr(maps, 'shape', None)}."
        )
    for name, t in (("images", images), ("maps", maps)):
        if not torch.isfinite(t).all():
            raise ValueError(f"Expected finite {name}, but got NaN or Inf values.")
    if p.target_mode == "label" and (target is None or target.shape != (images.shape[0],)):
        raise ValueError(
            "Expected target (B,) labels for target_mode='label', but got "
            f"{getattr(target, 'shape', None)}."
        )


def _forward(p: _Perturber, batch: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [p.model(batch[i : i + p.chunk_size]) for i in range(0, len(batch), p.chunk_size)]
        )


def _prepare(
    p: _Perturber, images: Tensor, maps: Tensor, target: Tensor | None, most_relevant_first: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Check inputs; return the clean logits, the class per image and each unit's removal rank."""
    _check(p, images, maps, target)
    logits = _forward(p, images)
    scores = _unit_scores(maps.to(images.device), tuple(images.shape[-2:]), p.unit, p.patch)
    tgt = logits.argmax(1) if p.target_mode == "predicted" else target.to(logits.device)
    return logits, tgt, _removal_ranks(scores, most_relevant_first)


def _perturbed(
    p: _Perturber, images: Tensor, ranks: Tensor, fraction: float, insert: bool = False
) -> Tensor:
    """Images with the first ``fraction`` of units (by rank) replaced by ``fill``; with
    ``insert``, a ``fill`` canvas with those units revealed instead."""
    k = int(fraction * ranks.shape[1])
    chosen = _to_pixel_mask(ranks < k, tuple(images.shape[-2:]), p.unit, p.patch)
    fill = p.fill.to(images).view(1, -1, 1, 1).expand_as(images)
    return torch.where(chosen, images, fill) if insert else torch.where(chosen, fill, images)


def _perturbation_update(
    p: _Perturber,
    images: Tensor,
    maps: Tensor,
    target: Tensor | None,
    mode: str,
    fractions: Sequence[float],
) -> Tensor:
    """Right predictions ``(F + 1,)`` float64 at fraction 0 (unperturbed) and at each fraction."""
    logits, tgt, ranks = _prepare(p, images, maps, target, mode == "positive")
    # one batched (chunked) pass per fraction: memory stays at one perturbed copy of the batch
    preds = torch.stack([_forward(p, _perturbed(p, images, ranks, f)).argmax(1) for f in fractions])
    return torch.cat([(logits.argmax(1) == tgt)[None], preds == tgt[None]]).double().sum(1)


def _perturbation_compute(correct: Tensor, count: Tensor, fractions: Sequence[float]) -> Tensor:
    """AUC x 100 of the accuracy curve over x = 0, *fractions."""
    x = torch.tensor([0.0, *fractions], dtype=torch.float64, device=correct.device)
    return (torch.trapezoid(correct / count.clamp_min(1), x) * 100).float()


def _rise_update(
    p: _Perturber, images: Tensor, maps: Tensor, target: Tensor | None, mode: str, steps: int
) -> Tensor:
    """Summed class probability ``(steps + 1,)`` float64 at fractions 0, 1/steps, ..., 1."""
    _, tgt, ranks = _prepare(p, images, maps, target, most_relevant_first=True)
    insert = mode == "insertion"
    fractions = [i / steps for i in range(steps + 1)]
    probs = torch.stack(
        [_forward(p, _perturbed(p, images, ranks, f, insert)).softmax(1) for f in fractions]
    )
    index = tgt.view(1, -1, 1).expand(len(fractions), -1, 1)
    return probs.gather(2, index)[..., 0].double().sum(1)


def _rise_compute(prob_sum: Tensor, count: Tensor, steps: int) -> Tensor:
    x = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=prob_sum.device)
    return torch.trapezoid(prob_sum / count.clamp_min(1), x).float()


def _flipping_update(
    p: _Perturber, images: Tensor, maps: Tensor, target: Tensor | None, steps: int
) -> Tensor:
    """Summed ``logit_LeRF - logit_MoRF`` of the class ``(steps + 1,)`` float64 at fractions
    0, 1/steps, ..., 1."""
    _check(p, images, maps, target)
    logits = _forward(p, images)
    tgt = logits.argmax(1) if p.target_mode == "predicted" else target.to(logits.device)
    scores = _unit_scores(maps.to(images.device), tuple(images.shape[-2:]), p.unit, p.patch)
    fractions = [i / steps for i in range(steps + 1)]
    curves = []
    for most_relevant_first in (False, True):
        ranks = _removal_ranks(scores, most_relevant_first)
        out = torch.stack([_forward(p, _perturbed(p, images, ranks, f)) for f in fractions])
        curves.append(out.gather(2, tgt.view(1, -1, 1).expand(len(fractions), -1, 1))[..., 0])
    return (curves[0] - curves[1]).double().sum(1)


def _flipping_compute(diff_sum: Tensor, count: Tensor, steps: int) -> Tensor:
    x = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=diff_sum.device)
    return torch.trapezoid(diff_sum / count.clamp_min(1), x).float()


def flipping_area(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: Tensor | None = None,
    unit: str = "patch",
    fill: float | Sequence[float] | Tensor | None = None,
    target_mode: str = "predicted",
    steps: int = 16,
    chunk_size: int = 64,
) -> Tensor:
    """AttnLRP's faithfulness: area between the LeRF and the MoRF curves of the class logit.

    Units (patches by default) are set to ``fill`` in order of relevance, most relevant first
    (MoRF) and least relevant first (LeRF), at fractions ``0, 1/steps, ..., 1``; the curves are
    the explained class's raw logit, the area ``trapezoid(LeRF - MoRF)`` over ``[0, 1]``, the mean
    over the images. Higher is better (a map that ranks the units by their effect opens the
    curves apart); a random map gives about 0. In logit units, so compare explainers on one model.

    Arguments as :func:`perturbation_auc`, with ``steps`` fractions after 0.

    Returns:
        Scalar area (logit units).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> flipping_area(model, torch.randn(2, 3, 32, 32), torch.rand(2, 4, 4)).shape
        torch.Size([])
    """
    check_positive_int("steps", steps)
    p = _perturber(model, unit, fill, target_mode, chunk_size)
    diff = _flipping_update(p, images, maps, target, steps)
    return _flipping_compute(diff, torch.tensor(float(images.shape[0])), steps)


def perturbation_auc(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: Tensor | None = None,
    mode: str = "positive",
    unit: str = "pixel",
    fill: float | Sequence[float] | Tensor | None = None,
    target_mode: str = "predicted",
    fractions: Sequence[float] = PAPER_FRACTIONS,
    chunk_size: int = 64,
) -> Tensor:
    """Perturbation-test AUC x 100 of one batch (the functional twin of ``PerturbationAUC``).

    Args:
        model: the classifier (called under ``torch.no_grad``; its mode is left as it is).
        images: ``(B, C, H, W)`` normalised as the model expects.
        maps: ``(B, h, w)`` patch-grid or ``(B, H, W)`` pixel relevance.
        target: ``(B,)`` labels, needed for ``target_mode="label"``.
        mode: ``"positive"`` (most relevant removed first; lower is better) or ``"negative"``.
        unit: ``"pixel"`` or ``"patch"``.
        fill: value of removed pixels: a float, a ``(C,)`` sequence, or None for black.
        target_mode: accuracy against ``"predicted"`` (the unperturbed top-1) or ``"label"``.
        fractions: removed fractions (paper: 0.1 ... 0.9).
        chunk_size: images per forward pass.

    Returns:
        Scalar AUC in [0, 100 * max(fractions)].

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> auc = perturbation_auc(model, torch.randn(2, 3, 32, 32), torch.rand(2, 4, 4))
        >>> 0.0 <= auc.item() <= 90.0
        True
    """
    _check_mode(mode, ("positive", "negative"))
    fr = _check_fractions(fractions)
    p = _perturber(model, unit, fill, target_mode, chunk_size)
    correct = _perturbation_update(p, images, maps, target, mode, fr)
    return _perturbation_compute(correct, torch.tensor(float(images.shape[0])), fr)


def deletion_insertion_auc(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: Tensor | None = None,
    mode: str = "deletion",
    unit: str = "pixel",
    fill: float | Sequence[float] | Tensor | None = None,
    target_mode: str = "predicted",
    steps: int = 10,
    chunk_size: int = 64,
) -> Tensor:
    """RISE deletion / insertion AUC of one batch (the functional twin of ``DeletionInsertionAUC``).

    Arguments as :func:`perturbation_auc`, with ``mode`` ``"deletion"`` (lower is better) or
    ``"insertion"`` (higher is better) and ``steps`` fractions after 0.

    Returns:
        Scalar AUC in [0, 1].
    """
    _check_mode(mode, ("deletion", "insertion"))
    check_positive_int("steps", steps)
    p = _perturber(model, unit, fill, target_mode, chunk_size)
    prob_sum = _rise_update(p, images, maps, target, mode, steps)
    return _rise_compute(prob_sum, torch.tensor(float(images.shape[0])), steps)


def check_subset(subset: object) -> int | float:
    """Return ``subset`` if it is an int >= 1 (units) or a float in (0, 1) (a share of them)."""
    if isinstance(subset, bool) or not isinstance(subset, (int, float)):
        raise TypeError(f"Expected subset an int >= 1 or a float in (0, 1), but got {subset!r}.")
    if (isinstance(subset, int) and subset < 1) or (
        isinstance(subset, float) and not 0 < subset < 1
    ):
        raise ValueError(f"Expected subset an int >= 1 or a float in (0, 1), but got {subset!r}.")
    return subset


def _subset_units(subset: int | float, units: int) -> int:
    k = max(1, math.ceil(subset * units - 1e-9)) if isinstance(subset, float) else subset
    if k >= units:
        raise ValueError(f"Expected subset fewer than the {units} units of an image, but got {k}.")
    return k


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation per row of ``(B, R)`` float64 pairs; NaN for a constant row."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    denominator = (a.square().sum(1) * b.square().sum(1)).sqrt()
    r = (a * b).sum(1) / denominator.clamp_min(torch.finfo(a.dtype).tiny)
    return torch.where(denominator > 0, r, torch.full_like(r, float("nan")))


def _faithfulness_correlation_update(
    p: _Perturber,
    images: Tensor,
    maps: Tensor,
    target: Tensor | None,
    runs: int,
    subset: int | float,
    seed: int,
    indices: Tensor | None = None,
) -> Tensor:
    """Per-image correlation ``(B,)`` float64 (NaN where it is undefined)."""
    check_positive_int("runs", runs)
    check_subset(subset)
    _check(p, images, maps, target)
    size = tuple(images.shape[-2:])
    scores = _unit_scores(maps.to(images.device), size, p.unit, p.patch).double()  # (B, U)
    b, units = scores.shape
    k = _subset_units(subset, units)
    generators = sample_generators(images, seed, indices)
    # each image's subsets: the k units of highest random key, ``runs`` times, from its generator
    chosen = torch.stack(
        [torch.rand(runs, units, generator=g).topk(k, dim=1).indices for g in generators]
    ).to(images.device)  # (B, runs, k)
    relevance = scores.gather(1, chosen.flatten(1)).view(b, runs, k).sum(2)  # (B, runs)
    logits = _forward(p, images)
    tgt = logits.argmax(1) if p.target_mode == "predicted" else target.to(logits.device)
    clean = logits.gather(1, tgt[:, None]).double()  # (B, 1)
    fill = p.fill.to(images).view(1, -1, 1, 1)
    drops = torch.empty(b, runs, dtype=torch.float64, device=images.device)
    per_pass = max(
        1, p.chunk_size // b
    )  # runs of the whole batch per pass: <= max(chunk, B) copies
    for start in range(0, runs, per_pass):
        part = chosen[:, start : start + per_pass]  # (B, r, k)
        r = part.shape[1]
        removed = torch.zeros(b, r, units, dtype=torch.bool, device=images.device)
        removed.scatter_(2, part, True)
        mask = _to_pixel_mask(removed.view(b * r, units), size, p.unit, p.patch)
        batch = torch.where(mask, fill, images.repeat_interleave(r, 0))
        out = _forward(p, batch).view(b, r, -1)
        perturbed = out.gather(2, tgt.view(b, 1, 1).expand(b, r, 1))[..., 0]
        drops[:, start : start + r] = clean - perturbed.double()
    return _pearson(relevance, drops)


def faithfulness_correlation(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: Tensor | None = None,
    runs: int = 100,
    subset: int | float = 224 / 224**2,
    unit: str = "pixel",
    fill: float | Sequence[float] | Tensor | None = None,
    target_mode: str = "predicted",
    seed: int = 0,
    indices: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """Mean faithfulness correlation (Bhatt et al., IJCAI 2020) of one batch, in [-1, 1].

    Args:
        model: the classifier (called under ``torch.no_grad``).
        images: ``(B, C, H, W)`` model inputs.
        maps: ``(B, h, w)`` relevance maps (upsampled to the units).
        target: ``(B,)`` labels for ``target_mode="label"``.
        runs: random subsets per image (forward passes per image).
        subset: units per subset: an int, or a share of the units (a float in (0, 1)).
        unit: ``"pixel"`` or ``"patch"``.
        fill: the removed units' value (None: black under the model's normalisation).
        target_mode: the class whose logit drops: ``"predicted"`` or ``"label"``.
        seed: the draws' seed; each sample's subsets come from ``(seed, its key)``.
        indices: ``(B,)`` dataset indices to key the draws on (None: the images' bytes).
        chunk_size: images per forward pass (the batch's perturbed copies go through in chunks).

    Returns:
        A scalar tensor (NaN if no image has a defined correlation).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> r = faithfulness_correlation(model, torch.randn(2, 3, 32, 32), torch.rand(2, 4, 4),
        ...                              runs=8, subset=0.1)
        >>> -1 <= r.item() <= 1
        True
    """
    p = _perturber(model, unit, fill, target_mode, chunk_size)
    scores = _faithfulness_correlation_update(p, images, maps, target, runs, subset, seed, indices)
    kept = scores[torch.isfinite(scores)]
    return kept.mean().float() if kept.numel() else torch.tensor(float("nan"))
