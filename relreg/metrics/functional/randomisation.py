"""Randomisation metrics as functions: does the map change when what it explains changes?

- :func:`random_logit`: Sixt, Granz & Landgraf, "When Explanations Lie: Why Many Modified BP
  Attributions Fail", ICML 2020. Each image is explained once more, for a random class other than
  the one its map explains, and the two maps are compared by SSIM (Wang et al., IEEE TIP 2004):
  a map that ignores the class scores 1; lower is better.

Conventions against Quantus' ``RandomLogit``
(``quantus/metrics/randomisation/random_logit.py``, with ``ssim`` of
``quantus/functions/similarity_func.py``): both divide each map by its largest absolute value
first (``normalise_by_max``) and take SSIM's data range as the pair's joint ``max - min``.
Quantus flattens the maps to vectors before calling scikit-image's ``structural_similarity``
(a 1-D SSIM along the flattened rows); relreg compares the maps as images, upsampled to the input's
pixels, with torchmetrics' SSIM and scikit-image's default window (uniform, 7 x 7). Quantus draws
the off classes with one ``np.random.seed`` per batch; relreg draws each sample's from its own
generator (:mod:`relreg.metrics.functional.sampling`), so that the result does not depend on the
batching. A pair of constant maps has no data range and is left out (Quantus: NaN).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from relreg.explain.tokens import to_pixels
from relreg.metrics.functional.sampling import sample_generators
from relreg.validate import check_choice

__all__ = ["map_ssim", "off_classes", "random_logit"]

TARGET_MODES = ("predicted", "label")
SSIM_WINDOW = 7  # scikit-image's default (uniform) window


def _unit_max(maps: Tensor) -> Tensor:
    top = maps.flatten(1).abs().amax(1).view(-1, 1, 1)
    return torch.where(top > 0, maps / top.clamp_min(torch.finfo(maps.dtype).tiny), maps)


def map_ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM ``(B,)`` of each pair of maps ``(B, H, W)``, data range their joint ``max - min``.

    Each pair is divided by its range (SSIM with range ``R`` on ``a, b`` is SSIM with range 1 on
    ``a / R, b / R``), so the whole batch goes through one torchmetrics call. NaN for a pair with
    no range (both constant and equal).

    Example:
        >>> import torch
        >>> a = torch.rand(2, 16, 16)
        >>> map_ssim(a, a).tolist()
        [1.0, 1.0]
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(
            f"Expected two (B, H, W) map batches of one shape, but got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    pair = torch.cat([a.flatten(1), b.flatten(1)], 1).double()
    scale = (pair.amax(1) - pair.amin(1)).view(-1, 1, 1)
    ok = scale.view(-1) > 0
    scale = scale.clamp_min(torch.finfo(torch.float64).tiny)
    ssim = structural_similarity_index_measure(
        (a.double() / scale)[:, None],
        (b.double() / scale)[:, None],
        gaussian_kernel=False,
        kernel_size=SSIM_WINDOW,
        data_range=1.0,
        reduction="none",
    )
    return torch.where(ok, ssim, torch.full_like(ssim, float("nan")))


def off_classes(classes: Tensor, num_classes: int, generators: list[torch.Generator]) -> Tensor:
    """A class other than ``classes[i]`` for each sample, uniform among the ``num_classes - 1``
    others, drawn from the sample's generator."""
    if num_classes < 2:
        raise ValueError(f"Expected a model with at least 2 classes, but got {num_classes}.")
    draws = torch.cat([torch.randint(0, num_classes - 1, (1,), generator=g) for g in generators])
    draws = draws.to(classes.device)
    return draws + (draws >= classes).long()


def _random_logit_update(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: Tensor | None,
    method: str,
    target_mode: str,
    seed: int,
    indices: Tensor | None = None,
    explain_options: Mapping[str, object] | None = None,
) -> Tensor:
    """Per-image SSIM ``(B,)`` float64 between the map and the map of a random other class."""
    from relreg.explain import explain

    check_choice("target_mode", target_mode, TARGET_MODES)
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"Expected images (B, C, H, W), but got {getattr(images, 'shape', None)}.")
    if not isinstance(maps, Tensor) or maps.ndim != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"Expected maps (B, h, w) for {images.shape[0]} images, but got "
            f"{getattr(maps, 'shape', None)}."
        )
    if target_mode == "label" and (target is None or target.shape != (images.shape[0],)):
        raise ValueError(
            "Expected target (B,) labels for target_mode='label', but got "
            f"{getattr(target, 'shape', None)}."
        )
    generators = sample_generators(images, seed, indices)
    with torch.no_grad():
        logits = model(images)
    classes = logits.argmax(1) if target_mode == "predicted" else target.to(logits.device)
    off = off_classes(classes, logits.shape[1], generators)
    with torch.inference_mode(False), torch.enable_grad():
        other = explain(model, images.clone(), method, target=off, **dict(explain_options or {}))
    size = tuple(images.shape[-2:])
    a = _unit_max(to_pixels(maps.detach().double(), size=size, normalize=False))
    b = _unit_max(to_pixels(other.detach().double(), size=size, normalize=False))
    return map_ssim(a, b)


def random_logit(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    method: str = "chefer",
    target: Tensor | None = None,
    target_mode: str = "predicted",
    seed: int = 0,
    indices: Tensor | None = None,
    explain_options: Mapping[str, object] | None = None,
) -> Tensor:
    """Mean random-logit SSIM (Sixt et al., ICML 2020) of one batch, in [-1, 1]; lower is better.

    Args:
        model: the classifier.
        images: ``(B, C, H, W)``.
        maps: ``(B, h, w)`` maps of ``method`` for the class ``target_mode`` names.
        method: the explainer that made ``maps`` (it explains the random classes).
        target: ``(B,)`` labels, for ``target_mode="label"``.
        target_mode: which class ``maps`` explain: ``"predicted"`` (top-1) or ``"label"``.
        seed: the draws' seed; each sample's class comes from ``(seed, its key)``.
        indices: ``(B,)`` dataset indices to key the draws on (None: the images' bytes).
        explain_options: keyword options of ``method``.

    Returns:
        A scalar tensor (NaN if no pair has a data range).

    Example:
        >>> import timm, torch
        >>> from relreg.explain import explain
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> random_logit(model, x, explain(model, x, "raw_attention"), "raw_attention")  # no class
        tensor(1.)
    """
    scores = _random_logit_update(
        model, images, maps, target, method, target_mode, seed, indices, explain_options
    )
    kept = scores[torch.isfinite(scores)]
    return kept.mean().float() if kept.numel() else torch.tensor(float("nan"))
