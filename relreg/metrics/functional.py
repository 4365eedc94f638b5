"""Functional explanation-quality metrics (the math of the ``Metric`` classes lives here once).

- relevance mass: the fraction of an image's (non-negative) relevance that lies inside its
  foreground mask (Arras, Osman & Samek, "CLEVR-XAI", Information Fusion 2022).
"""

from __future__ import annotations

from torch import Tensor

from relreg.explain.tokens import to_pixels

__all__ = ["relevance_mass", "_relevance_mass_update"]


def _check_maps_masks(maps: Tensor, masks: Tensor) -> None:
    if not isinstance(maps, Tensor) or not isinstance(masks, Tensor):
        raise TypeError("Expected maps and masks to be torch.Tensors.")
    if maps.ndim != 3 or masks.ndim != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(
            f"Expected maps (B, h, w) and masks (B, H, W) with the same B, but got {tuple(maps.shape)} and {tuple(masks.shape)}."
        )
    if ((masks < 0) | (masks > 1)).any():
        raise ValueError("Expected mask values in [0, 1].")


def _relevance_mass_update(maps: Tensor, masks: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-image fraction ``(B,)`` of relevance inside the mask, after upsampling the maps to the
    masks and min-max normalising them (so any map is non-negative)."""
    _check_maps_masks(maps, masks)
    pix = to_pixels(maps.detach().float(), size=masks.shape[-2:], normalize=True)
    inside = (pix * masks.float()).flatten(1).sum(1)
    return inside / pix.flatten(1).sum(1).clamp_min(eps)


def relevance_mass(maps: Tensor, masks: Tensor) -> Tensor:
    """Mean fraction of relevance inside the masks.

    Args:
        maps: ``(B, h, w)`` or ``(B, H, W)`` relevance (upsampled bilinearly to the masks and min-max
            normalised per image; a constant map counts as 0 inside).
        masks: ``(B, H, W)`` foreground masks in [0, 1].

    Returns:
        A scalar tensor in [0, 1]; higher is better.

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[0.0, 1.0], [0.0, 3.0]]])
        >>> masks = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
        >>> relevance_mass(maps, masks)
        tensor(1.)
    """
    return _relevance_mass_update(maps, masks).mean()
