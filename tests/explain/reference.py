"""Naive references, written the way the papers' code does it: one image at a time, attention
saved by a hook with ``register_hook`` for its gradient, full N x N matrix products."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from relreg.explain.capture import find_attention_modules


def _record_one(model: nn.Module, image: Tensor, cls: int) -> tuple[list[Tensor], list[Tensor]]:
    attns: list[Tensor] = []
    grads: dict[int, Tensor] = {}

    def pre_hook(module, args):
        a = args[0]
        i = len(attns)
        attns.append(a.detach())
        a.register_hook(lambda g, i=i: grads.__setitem__(i, g.detach()))

    modules = find_attention_modules(model)
    flags = [m.fused_attn for m in modules]
    handles = [m.attn_drop.register_forward_pre_hook(pre_hook) for m in modules]
    for m in modules:
        m.fused_attn = False
    try:
        x = image[None].clone().requires_grad_(True)
        out = model(x)
        one_hot = torch.zeros_like(out)
        one_hot[0, cls] = 1
        model.zero_grad()
        (one_hot * out).sum().backward()
    finally:
        for h, m, f in zip(handles, modules, flags, strict=True):
            h.remove()
            m.fused_attn = f
    model.zero_grad(set_to_none=True)
    return attns, [grads[i] for i in range(len(attns))]


def dense_chefer(
    model: nn.Module,
    images: Tensor,
    classes: Tensor,
    prefix: int,
    start_layer: int = 0,
    gradient: str = "attention",
) -> Tensor:
    """R = I; R = R + Abar @ R per block; CLS row, patch columns; (B, P).

    ``gradient="logits"``: the gradient w.r.t. the attention logits, by the softmax Jacobian
    applied row by row (``dA_ij/ds_ik = A_ij (delta_jk - A_ik)``), as a dense N x N product.
    """
    rows = []
    for image, cls in zip(images, classes.tolist(), strict=True):
        attns, grads = _record_one(model, image, cls)
        n = attns[0].shape[-1]
        r = torch.eye(n, dtype=images.dtype)
        for a, g in list(zip(attns, grads, strict=True))[start_layer:]:
            if gradient == "logits":  # ds = J^T g with J = diag(A_i) - A_i A_i^T per row i
                jac = torch.diag_embed(a) - a.unsqueeze(-1) * a.unsqueeze(-2)
                ds = (jac @ g.unsqueeze(-1)).squeeze(-1)
                abar = ds.clamp(min=0).mean(dim=1)[0]
            else:
                abar = (g * a).clamp(min=0).mean(dim=1)[0]
            r = r + abar @ r
        rows.append(r[0, prefix:])
    return torch.stack(rows)


def dense_rollout(model: nn.Module, images: Tensor, prefix: int, start_layer: int = 0) -> Tensor:
    """R = M_1; R = M_b @ R; CLS row, patch columns; (B, P)."""
    rows = []
    for image in images:
        attns, _ = _record_one(model, image, 0)
        n = attns[0].shape[-1]
        r = None
        for a in attns[start_layer:]:
            m = a.mean(dim=1)[0] + torch.eye(n, dtype=images.dtype)
            m = m / m.sum(dim=-1, keepdim=True)
            r = m if r is None else m @ r
        rows.append(r[0, prefix:])
    return torch.stack(rows)


def dense_gradcam(model: nn.Module, images: Tensor, classes: Tensor, prefix: int) -> Tensor:
    """CVPR 2021 GradCAM: last block, per-head mean gradient of the CLS row times attention.

    Returns ``(B, P)``.
    """
    rows = []
    for image, cls in zip(images, classes.tolist(), strict=True):
        attns, grads = _record_one(model, image, cls)
        cam = attns[-1][0, :, 0, prefix:]
        grad = grads[-1][0, :, 0, prefix:].mean(dim=-1, keepdim=True)
        rows.append((cam * grad).mean(dim=0).clamp(min=0))
    return torch.stack(rows)
