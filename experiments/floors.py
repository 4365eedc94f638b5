"""The compute floor of each phase of a ViT training step, from throughputs measured in-process.

The relevance step's floor is the plain step, plus one backward pass to the attention outputs
without weight gradients, plus the relevance recompute. Per phase:

- ``forward``, ``final_backward``, ``other``: the plain step's own phase, measured in the same run
  (the same work through the same kernels, fused attention included);
- ``input_gradient_backward`` (the backward pass to every block's attention output): the plain
  step's ``final_backward`` less its weight gradients, one linear product per layer,
  ``2 B N W L`` FLOPs at the measured linear rate;
- ``relevance_forward``: ``4 B h N^2 d L`` FLOPs (``q k^T`` and ``dO v^T`` per chunk) at the
  measured N^2 rate; ``relevance_backward``: ``8 B h N^2 d L`` (the two again, then ``dS k`` and
  ``dS^T q``).

The two rates are measured here and now at the model's shapes (median of several runs):
**linear**, the blocks' dense layers ``(B N, D) @ (D, D')``, and **N^2**, the attention products
``(B heads, N, d) @ (B heads, d, N)``. ``W`` is the blocks' linear weights per token (``4 D^2 +
2 D Dm`` for a plain ViT block of MLP width ``Dm``), ``L`` blocks, ``h`` heads of size ``d``, ``N``
tokens, batch ``B``. Softmax, clamps and other element-wise work are left out: their share is what
a relevance phase's time has above its floor. The fused kernel's own products are not priced at the
bmm rate: on this CPU they run faster than a stand-alone bmm at these shapes, which is why the
phases the plain step has are floored by the plain step itself.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

__all__ = ["phase_floors", "step_floors", "throughputs"]


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


def phase_floors(model: nn.Module, batch: int, rates: dict[str, float]) -> dict[str, float]:
    """The FLOP-derived part of the floors (see the module docstring), in seconds at ``rates``:
    ``relevance_forward``, ``relevance_backward`` and ``weight_gradients`` (the linear products
    a backward pass without weight gradients skips)."""
    s = _shapes(model, batch)
    b, n, h, d, depth = (s[k] for k in ("B", "N", "h", "d", "L"))
    linear_s = 2 * b * n * s["W"] / (rates["linear_gflops"] * 1e9)
    n2_s = b * h * n * n * d * depth / (rates["n2_gflops"] * 1e9)
    return {
        "relevance_forward": round(4 * n2_s, 4),
        "relevance_backward": round(8 * n2_s, 4),
        "weight_gradients": round(linear_s, 4),
    }


def step_floors(flops_part: dict[str, float], plain_phases: dict[str, float]) -> dict[str, float]:
    """Every phase's floor: the FLOP-derived part and the plain step's measured phases."""
    return {
        "forward": plain_phases["forward"],
        "input_gradient_backward": round(
            max(plain_phases["final_backward"] - flops_part["weight_gradients"], 0.0), 4
        ),
        "relevance_forward": flops_part["relevance_forward"],
        "relevance_backward": flops_part["relevance_backward"],
        "final_backward": plain_phases["final_backward"],
        "other": plain_phases["other"],
    }
