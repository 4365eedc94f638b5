"""Tiny random-weight configurations of the timm ViT families relreg explains, shared by the
family-table test and the per-family engine tests.

Each entry is ``(timm model name, keyword arguments)``: a depth-2, 32-pixel (48 for patch-16
hierarchies) model of the family's own classes (rotary attention, relative position bias, register
tokens, attention pooling, window attention), built offline.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

__all__ = ["FAMILIES", "build_family"]

_TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}

FAMILIES: dict[str, tuple[str, dict]] = {
    "vit": ("vit_tiny_patch16_224", _TINY),
    "deit (distilled)": ("deit_tiny_distilled_patch16_224", _TINY),
    "deit3": ("deit3_small_patch16_224", _TINY),
    "dinov2 + registers": ("vit_small_patch14_reg4_dinov2", _TINY),
    "CLIP ViT": ("vit_base_patch16_clip_224", _TINY),
    "SigLIP (map)": ("vit_base_patch16_siglip_224", _TINY),
    "EVA-02": ("eva02_tiny_patch14_224", _TINY),
    "DINOv3 (rotary)": ("vit_small_patch16_dinov3", _TINY),
    "RoPE-ViT": ("vit_small_patch16_rope_224", _TINY),
    "BEiT": ("beitv2_base_patch16_224", _TINY),
    "NaFlexViT": ("naflexvit_base_patch16_gap", _TINY),
    "Swin": (
        "swin_tiny_patch4_window7_224",
        {
            "img_size": 32,
            "patch_size": 4,
            "window_size": 4,
            "embed_dim": 16,
            "depths": (1, 1),
            "num_heads": (1, 2),
        },
    ),
}


def build_family(
    family: str, num_classes: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Module:
    """The tiny model of ``family`` (a key of :data:`FAMILIES`), in eval mode."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    return model.to(dtype).eval()
