"""Shared fixtures: tiny timm ViTs (random weights, CPU, milliseconds per call)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads these once): no network here, fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# name -> (timm model, overrides): every timm token layout relreg promises to handle.
TINY_VITS: dict[str, tuple[str, dict]] = {
    "vit": ("vit_tiny_patch16_224", {}),
    "vit_nonsquare": ("vit_tiny_patch16_224", {"img_size": (16, 24)}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "vit_registers": ("vit_tiny_patch16_224", {"reg_tokens": 3}),
}


class ManualAttention(timm.layers.Attention):
    """timm's Attention computed without the fused kernel, whatever ``fused_attn`` says: readable
    by the dense engine (through ``attn_drop``), and only the forward pass shows the chunked engine
    that the block never calls the kernel."""

    def forward(self, x, attn_mask=None, is_causal=False):
        fused = self.fused_attn
        self.fused_attn = False
        try:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        finally:
            self.fused_attn = fused


def make_tiny_vit(
    name: str = "vit_tiny_patch16_224",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> nn.Module:
    """A 2-block, 2-head, 24-dim timm ViT for 16x16 images, 4x4 patches, 5 classes, in eval mode."""
    kwargs = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).to(dtype).eval()
    # timm initialises the head to zeros for some models: random weights give non-trivial gradients.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model


def images_for(model: nn.Module, batch: int = 3, seed: int = 1) -> torch.Tensor:
    """Random (B, 3, H, W) images matching the model's input size and dtype."""
    h, w = model.patch_embed.img_size
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, 3, h, w, generator=g).to(dtype)


@pytest.fixture(params=sorted(TINY_VITS))
def any_vit(request: pytest.FixtureRequest) -> nn.Module:
    """Each tiny ViT layout in turn."""
    name, overrides = TINY_VITS[request.param]
    return make_tiny_vit(name, **overrides)


@pytest.fixture
def vit() -> nn.Module:
    return make_tiny_vit()


def model_state(model: nn.Module) -> dict:
    """Everything an explainer must leave as it found it: mode, flags, hooks."""
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "fused_attn": [getattr(m, "fused_attn", None) for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "grads": [p.grad is None for p in model.parameters()],
    }
