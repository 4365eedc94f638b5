"""The compute floor of each phase of a ViT training step, from throughputs measured in-process.

A phase's floor is its FLOPs in two kinds of product, each divided by the rate this machine runs
that kind at the model's own shapes, measured here and now (median of several runs):

- **linear**: the blocks' dense layers (qkv, proj, fc1, fc2), ``(B N, D) @ (D, D')``;
- **N^2**: the attention products ``(B heads, N, d) @ (B heads, d, N)`` and back.

FLOPs per phase, for ``L`` blocks of width ``D`` (linear weights ``W = 4 D^2 + 2 D Dm`` per
block for MLP width ``Dm``), ``h`` heads of size ``d`` and
``N`` tokens, batch ``B`` (patch embedding, norms, softmax and element-wise work left out: their
share is what a phase's measured time has above its floor):

- ``forward``: linear ``2 B N W L``; N^2 ``4 B h N^2 d L`` (``q k^T`` and ``A v``);
- ``input_gradient_backward`` (the backward pass to every block's attention output, no weight
  gradients): linear the forward's (one product per layer for the input gradient); N^2
  ``10 B h N^2 d L`` (the fused kernel's backward: ``q k^T`` again, ``dO v^T``, ``dS k``,
  ``dS^T q``, ``A^T dO``);
- ``relevance_forward``: N^2 ``4 B h N^2 d L`` (``q k^T`` and ``dO v^T`` per chunk);
- ``relevance_backward``: N^2 ``8 B h N^2 d L`` (the two again, then ``dS k`` and ``dS^T q``);
- ``final_backward``: linear twice the forward's (input and weight gradients); N^2 the fused
  kernel's backward, ``10 B h N^2 d L``;
- ``other`` (optimiser, loss): no floor is derived; the plain step's own is used.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

__all__ = ["phase_floors", "throughputs"]


def _rate(fn, flops: float, repeats: int = 5) -> float:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e9


def _shapes(model: nn.Module, batch: int) -> dict[str, int]:
    """Batch, tokens, width, heads, head size, depth, and the blocks' linear weights per token
    (``sum in * out`` over their ``nn.Linear`` layers: ``4 D^2 + 2 D Dm`` for a plain ViT block,
    more for SwiGLU's three)."""
    heads = model.blocks[0].attn.num_heads
    dim = model.embed_dim
    weights = sum(
        m.in_features * m.out_features for m in model.blocks.modules() if isinstance(m, nn.Linear)
    )
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    return {"B": batch, "N": tokens, "D": dim, "h": heads, "d": dim // heads,
            "L": len(model.blocks), "W": weights}  # fmt: skip


def throughputs(model: nn.Module, batch: int) -> dict[str, float]:
    """GFLOP/s of the linear layers (qkv and fc1 at ``model``'s width) and of the N^2 attention
    products at ``model``'s shapes."""
    s = _shapes(model, batch)
    b, n, dim, h, d = s["B"], s["N"], s["D"], s["h"], s["d"]
    mlp = 4 * dim
    x = torch.randn(b * n, dim)
    w_qkv = torch.randn(dim, 3 * dim)
    w_fc1 = torch.randn(dim, mlp)
    q = torch.randn(b * h, n, d)
    kt = torch.randn(b * h, d, n)
    with torch.no_grad():
        linear = _rate(lambda: (x @ w_qkv, x @ w_fc1), 2 * b * n * dim * (3 * dim + mlp))
        n2 = _rate(lambda: torch.bmm(q, kt), 2 * b * h * n * n * d)
    return {"linear_gflops": round(linear, 1), "n2_gflops": round(n2, 1)}


def phase_floors(
    model: nn.Module, batch: int, rates: dict[str, float], other_s: float
) -> dict[str, float]:
    """Seconds each phase of a relevance step cannot go below at ``rates`` (see the module
    docstring); ``other_s`` is the plain step's ``other`` phase."""
    s = _shapes(model, batch)
    b, n, h, d, depth = (s[k] for k in ("B", "N", "h", "d", "L"))
    lin = 2 * b * n * s["W"]
    n2 = b * h * n * n * d * depth

    def secs(linear_flops: float, n2_flops: float) -> float:
        return linear_flops / (rates["linear_gflops"] * 1e9) + n2_flops / (rates["n2_gflops"] * 1e9)

    return {
        "forward": round(secs(lin, 4 * n2), 4),
        "input_gradient_backward": round(secs(lin, 10 * n2), 4),
        "relevance_forward": round(secs(0, 4 * n2), 4),
        "relevance_backward": round(secs(0, 8 * n2), 4),
        "final_backward": round(secs(2 * lin, 10 * n2), 4),
        "other": round(other_s, 4),
    }
