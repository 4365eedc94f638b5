"""Figures of explanations: heatmap overlays with a colour bar, and method-by-image grids.

Matplotlib with the non-interactive Agg backend; files are written to a temporary name and
renamed, so a crash never leaves a half-written figure.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from relreg.io import atomic_write  # noqa: E402

__all__ = ["explanation_title", "overlay_figure", "explanation_grid", "save_figure"]

_CAPTION_WIDTH = 12  # characters per line of a row caption


def _hwc(image: Tensor) -> Tensor:
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"Expected an image of shape (3, H, W) or (1, H, W), but got {tuple(image.shape)}."
        )
    return image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).squeeze(-1)


def explanation_title(
    prefix: str,
    probs: Tensor,
    names: Sequence[str],
    target: int | None = None,
    foil: int | None = None,
) -> str:
    """``"<prefix>: <class name> (#index, p=0.87)"``, and ``" vs <foil> (#index, p=...)"``.

    Args:
        prefix: e.g. the image's name and the method.
        probs: ``(K,)`` class probabilities of the image.
        names: ``K`` class names (see :func:`relreg.data.class_names`).
        target: the explained class (None: the top-1 class, as the explainers do).
        foil: the contrast class, if any.
    """

    def part(k: int) -> str:
        return f"{names[k]} (#{k}, p={float(probs[k]):.2f})"

    k = int(probs.argmax()) if target is None else int(target)
    return f"{prefix}: {part(k)}" + (f" vs {part(int(foil))}" if foil is not None else "")


def overlay_figure(image: Tensor, pixel_map: Tensor, title: str = "", alpha: float = 0.5) -> Figure:
    """Image, heatmap and overlay side by side, with a colour bar.

    Args:
        image: ``(3, H, W)`` in [0, 1] (un-normalised).
        pixel_map: ``(H, W)`` relevance, e.g. a row of :func:`relreg.explain.to_pixels`.
        title: figure title.
        alpha: heatmap opacity in the overlay.
    """
    img = _hwc(image)
    heat = pixel_map.detach().float().cpu()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), constrained_layout=True)
    axes[0].imshow(img)
    axes[0].set_title("image")
    shown = axes[1].imshow(heat, cmap="jet")
    axes[1].set_title("relevance")
    axes[2].imshow(img)
    axes[2].imshow(heat, cmap="jet", alpha=alpha)
    axes[2].set_title("overlay")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=axes, shrink=0.8, label="relevance")
    if title:
        fig.suptitle(title)
    return fig


def explanation_grid(
    images: Tensor,
    maps: Mapping[str, Tensor],
    row_titles: Sequence[str] | None = None,
    alpha: float = 0.55,
) -> Figure:
    """One row per image, one column per method: ``(B, H, W)`` maps over ``(B, 3, H, W)`` images.

    Row captions (``row_titles``, e.g. ``"#12 pred 3 label 3 mass 0.45"``) are written
    horizontally left of each row and wrapped to a few words per line, so a long caption grows
    the figure's margin instead of running into the next row's.
    """
    b = images.shape[0]
    cols = len(maps) + 1
    fig, axes = plt.subplots(
        b, cols, figsize=(1.7 * cols, 1.7 * b + 0.4), squeeze=False, constrained_layout=True
    )
    for i in range(b):
        img = _hwc(images[i])
        axes[i, 0].imshow(img)
        caption = textwrap.fill(row_titles[i] if row_titles else f"#{i}", width=_CAPTION_WIDTH)
        axes[i, 0].set_ylabel(caption, fontsize=7, rotation=0, ha="right", va="center")
        for j, (name, m) in enumerate(maps.items(), start=1):
            axes[i, j].imshow(img)
            axes[i, j].imshow(m[i].detach().float().cpu(), cmap="jet", alpha=alpha, vmin=0, vmax=1)
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save ``fig`` atomically (temporary file, then rename; :func:`relreg.io.atomic_write`) and
    close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)
