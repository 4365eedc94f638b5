"""Foreground masks for images that have none: TokenCut (unsupervised, as RobustViT suggests) and
text-prompted open segmenters (CLIPSeg, SAM 3), written in the layout the fit configs read.

Example:
    >>> from relreg.masks import make_masks  # doctest: +SKIP
    >>> make_masks("my_images", "my_masked", "tokencut", per_class=3)  # doctest: +SKIP
"""

from relreg.masks.bilateral import bilateral_refine
from relreg.masks.make import SUMMARY_FILE, make_masks, summarize
from relreg.masks.methods import MASK_METHODS, list_mask_methods
from relreg.masks.text import CLIPSegMasks, SAM3Masks
from relreg.masks.tokencut import TokenCut, normalized_cut, seed_component

__all__ = [
    "MASK_METHODS",
    "SUMMARY_FILE",
    "CLIPSegMasks",
    "SAM3Masks",
    "TokenCut",
    "bilateral_refine",
    "list_mask_methods",
    "make_masks",
    "normalized_cut",
    "seed_component",
    "summarize",
]
