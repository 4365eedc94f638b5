"""A one-block timm ViT whose keys are constructed so that TokenCut's right answer is known:
a patch's key is its mean colour's (red - blue) sign, so red and blue patches form two cliques of
the graph (cosine 1 within, -1 across) and the smaller clique is the foreground."""

from __future__ import annotations

import timm
import torch
from torch import nn

SIZE, PATCH = 32, 4
GRID = SIZE // PATCH


def planted_vit(reg_tokens: int = 0) -> nn.Module:
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=SIZE,
        patch_size=PATCH,
        embed_dim=4,
        depth=1,
        num_heads=1,
        reg_tokens=reg_tokens,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        weight = model.patch_embed.proj.weight  # (4, 3, p, p)
        for dim, (channel, sign) in enumerate([(0, 1.0), (0, -1.0), (2, 1.0), (2, -1.0)]):
            weight[dim, channel] = sign / PATCH**2
        block = model.blocks[0]
        block.norm1.weight.fill_(1.0)
        block.attn.qkv.weight[4:8] = torch.eye(4)  # k = LayerNorm(token)
    return model


def object_image(cells: list[tuple[int, int, int, int]], size: int = SIZE) -> torch.Tensor:
    """``(3, size, size)`` uint8: blue, with red rectangles in patch cells ``(r0, r1, c0, c1)``."""
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    image[2] = 255
    scale = size // GRID
    for r0, r1, c0, c1 in cells:
        image[0, r0 * scale : r1 * scale, c0 * scale : c1 * scale] = 255
        image[2, r0 * scale : r1 * scale, c0 * scale : c1 * scale] = 0
    return image
