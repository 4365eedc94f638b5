"""Occlusion: slide a window over the image, fill it with a baseline, and record how much the
explained score drops (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks",
ECCV 2014; the sliding-window form of captum's ``Occlusion``).

Model-agnostic and not differentiable. The occluded copies of a batch are scored in chunks of
``internal_batch_size`` images, so memory stays bounded whatever the number of windows, and the
result does not depend on the chunking. Each pixel's relevance is the mean score drop over the
windows that cover it (0 where none does); with ``window = stride = patch size`` (the default for
a ViT) every patch is occluded once, the reference "what does the prediction read" map.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from relreg.explain._contract import (
    Explanation,
    TargetLike,
    expand_baseline,
    pair,
    perturbed_scores,
    reference_scores,
    score,
)
from relreg.explain.registry import register_explainer

__all__ = ["occlusion", "occlusion_windows"]


def occlusion_windows(
    size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]
) -> Tensor:
    """``(P, H, W)`` float masks, 1 inside each window position (row-major), 0 elsewhere.

    Raises:
        ValueError: a window larger than the image.
    """
    n_rows, n_cols = _grid(size, window, stride)
    masks = torch.zeros(n_rows * n_cols, *size)
    for p in range(n_rows * n_cols):
        top = (p // n_cols) * stride[0]
        left = (p % n_cols) * stride[1]
        masks[p, top : top + window[0], left : left + window[1]] = 1.0
    return masks


def _grid(
    size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int]:
    """How many window positions fit down and across; raises for a window larger than the image."""
    h, w = size
    wh, ww = window
    sh, sw = stride
    if wh > h or ww > w:
        raise ValueError(f"Expected a window no larger than the image {size}, but got {window}.")
    return (h - wh) // sh + 1, (w - ww) // sw + 1


@register_explainer(
    "occlusion",
    output="pixel",
    paper="Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014",
    differentiable=False,
)
def occlusion(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    window: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    baseline: float | Tensor = 0.0,
    internal_batch_size: int | None = 64,
    progress: bool | None = None,
) -> Explanation:
    """Mean score drop of the windows covering each pixel: ``(B, H, W)`` (signed).

    Args:
        window: window size in pixels (int or ``(h, w)``); default: the model's patch size
            (``patch_embed.patch_size``), else 16.
        stride: step between windows; default: ``window`` (no overlap).
        baseline: fill value: a float (0 is the dataset mean in normalised inputs) or a tensor
            broadcastable to ``(B, C, H, W)``.
        internal_batch_size: occluded images per forward pass (None: all at once).
        progress: a progress bar over the forward passes (None: once the call has run 5 s).
    """
    tgt, fl, logits = reference_scores(model, images, target, foil)
    default = getattr(getattr(model, "patch_embed", None), "patch_size", None) or 16
    (wh, ww) = win = pair("window", window if window is not None else default)
    (sh, sw) = step = pair("stride", stride if stride is not None else win)
    (h, w) = size = tuple(images.shape[-2:])
    n_rows, n_cols = _grid(size, win, step)
    count = n_rows * n_cols
    base = expand_baseline(baseline, images)
    clean = score(logits, tgt, fl)
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)

    def occluded(b: Tensor, v: Tensor) -> Tensor:
        # the windows of this chunk only: memory does not grow with the number of windows
        top = (v // n_cols) * sh
        left = (v % n_cols) * sw
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + wh)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + ww)
        m = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1).to(images.dtype)
        return images[b] * (1 - m) + base[b] * m

    scores = perturbed_scores(
        model,
        occluded,
        batch=images.shape[0],
        count=count,
        target=tgt,
        foil=fl,
        internal_batch_size=internal_batch_size,
        progress=progress,
        desc="occlusion",
    )
    drop = (clean.unsqueeze(1) - scores).to(images.dtype)  # (B, P), windows row-major
    # each window adds its drop to its pixels: a sliding-window sum, as fold computes it
    spread = drop.unsqueeze(1).expand(-1, wh * ww, -1)
    total = nn.functional.fold(spread, size, kernel_size=win, stride=step)[:, 0]
    covered = nn.functional.fold(torch.ones_like(spread[:1]), size, kernel_size=win, stride=step)
    maps = total / covered[:, 0].clamp_min(1.0)
    return Explanation(maps.detach(), logits.detach())
