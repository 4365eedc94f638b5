"""Joint image + mask transforms (torchvision ``transforms.v2``): masks stay aligned with their
images and are resized with nearest-neighbour interpolation, so they stay binary.

Presets follow RobustViT (NeurIPS 2022): train ``Resize((256, 256))``, ``RandomCrop(224)``,
horizontal flip; eval ``Resize(256)``, ``CenterCrop(224)``; mean = std = 0.5. For another
``img_size`` the resize is scaled by 256 / 224.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

__all__ = ["train_transform", "eval_transform"]

_PAPER_MEAN = (0.5, 0.5, 0.5)


def _resize_for(img_size: int) -> int:
    return int(round(img_size * 256 / 224))


def _mode(interpolation: str) -> v2.InterpolationMode:
    return v2.InterpolationMode(interpolation)


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(
    img_size: int = 224,
    mean: Sequence[float] = _PAPER_MEAN,
    std: Sequence[float] = _PAPER_MEAN,
    flip: bool = True,
    resize: int | None = None,
    interpolation: str = "bilinear",
) -> v2.Compose:
    """Resize to a square, random crop, optional flip, to float, normalise (image only).

    Call it as ``image, mask = transform(tv_tensors.Image(x), tv_tensors.Mask(m))``; masks are
    resized with nearest neighbours whatever ``interpolation`` says.

    Args:
        img_size: crop size.
        mean, std: normalisation.
        flip: random horizontal flip.
        resize: side of the square resize (default ``img_size * 256 / 224``).
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
    """
    side = resize or _resize_for(img_size)
    steps = [
        v2.Resize((side, side), interpolation=_mode(interpolation), antialias=True),
        v2.RandomCrop(img_size),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _finish(mean, std))


def eval_transform(
    img_size: int = 224,
    mean: Sequence[float] = _PAPER_MEAN,
    std: Sequence[float] = _PAPER_MEAN,
    resize: int | None = None,
    interpolation: str = "bilinear",
    squash: bool = False,
) -> v2.Compose:
    """Resize the shorter side (both sides if ``squash``), centre crop, to float, normalise (image
    only); ``resize`` defaults to ``img_size * 256 / 224``."""
    side = resize or _resize_for(img_size)
    resize_step = v2.Resize(
        (side, side) if squash else side, interpolation=_mode(interpolation), antialias=True
    )
    return v2.Compose([resize_step, v2.CenterCrop(img_size)] + _finish(mean, std))
