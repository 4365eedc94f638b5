"""Attention-based explainers for timm ViTs: raw attention, rollout, GradCAM and Chefer relevance.

- ``raw_attention``: last block, head mean, read-out (CLS) row, patch columns.
- ``rollout``: Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.
- ``gradcam``: ViT GradCAM as coded for the comparison of Chefer, Gur & Wolf, "Transformer
  Interpretability Beyond Attention Visualization", CVPR 2021 (last block, gradient averaged over
  the CLS row's patch columns as per-head weight, times attention, head mean, ReLU).
- ``chefer``: gradient-weighted relevance of Chefer, Gur & Wolf, "Generic Attention-model
  Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021, the rule
  RobustViT (Chefer, Schwartz & Wolf, NeurIPS 2022) trains with.

All return raw (not normalised) relevance on the patch grid, ``(B, gh, gw)``. Only the read-out
row of the relevance matrix is needed, so it is propagated as a row vector ``v: (B, N)`` from the
last block to the first: ``O(N^2)`` per block instead of the ``O(N^3)`` matrix products.
One forward pass and, for gradient-weighted methods, one backward pass that stops at the attention
(no weight gradients) serve the whole batch. ``chefer``, ``rollout`` and ``raw_attention`` run on
the chunked engine by default (:mod:`relreg.explain.chunked`: fused attention kept, attention
recomputed by chunks of query rows); ``engine="dense"`` stores every block's ``(B, h, N, N)``
attention (and gradient) with :class:`relreg.explain.AttentionCapture` instead. Each of them has
a dense and a chunked implementation; :func:`relreg.explain.engine.select_engine` chooses
between them (``gradcam`` is dense only).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from relreg.explain._contract import (
    Explanation,
    TargetLike,
    check_grad_mode,
    check_logits,
    check_start_layer,
    finish,
    graph_input,
    resolve_classes,
    score,
)
from relreg.explain.capture import AttentionCapture, KernelCapture
from relreg.explain.chunked import (
    Captured,
    block_step,
    capture_blocks,
    record_blocks,
)
from relreg.explain.engine import EngineChoice, select_engine
from relreg.explain.registry import register_explainer
from relreg.explain.tokens import (
    _patches_to_grid,
    _readout,
    _to_grid,
    num_prefix_tokens,
    pool_readout,
    readout_weights,
)

__all__ = ["raw_attention", "rollout", "gradcam", "chefer"]


class _DensePass(NamedTuple):
    """The dense engine's records of one forward pass.

    Attributes:
        attentions: ``(B, h, N, N)`` per block, in forward order.
        grads: their gradients ``dy/dA`` (None when not asked for).
        logits: ``(B, K)``.
        pool: the attention pool's probabilities ``(B, h, L, N)`` (``global_pool="map"``), or
            None.
        d_pool: their gradient, or None.
    """

    attentions: list[Tensor]
    grads: list[Tensor] | None
    logits: Tensor
    pool: Tensor | None
    d_pool: Tensor | None


def _attention_pass(
    model: nn.Module,
    images: Tensor,
    target: TargetLike,
    foil: TargetLike,
    need_grad: bool,
    differentiable: bool,
    second_order: bool,
    method: str,
) -> _DensePass:
    """One forward pass recording attention ``(B, h, N, N)`` per block (and the attention pool's
    probabilities), and their gradients if asked."""
    if need_grad or differentiable:
        check_grad_mode(method)
    track = need_grad or differentiable
    x = graph_input(model, images, track)  # a graph must reach every attention map
    with torch.set_grad_enabled(track):
        with AttentionCapture(model) as capture, KernelCapture(model, read_blocks=False) as pool:
            logits = check_logits(model(x), images.shape[0])
        attentions = capture.attentions
        if len(attentions) != len(capture.modules):
            raise RuntimeError(
                f"Expected one attention map per attention module ({len(capture.modules)}), but "
                f"recorded {len(attentions)}: the model does not call its blocks' attn_drop once "
                "each."
            )
        pooled = next((c.attention for c in pool.calls if c.pool), None)
        tgt, fl = resolve_classes(logits, target, foil)
        if not need_grad:
            return _DensePass(attentions, None, logits, pooled, None)
        grads = list(
            torch.autograd.grad(
                score(logits, tgt, fl).sum(),
                attentions + ([pooled] if pooled is not None else []),
                retain_graph=differentiable,
                create_graph=second_order,
            )
        )
    d_pool = grads.pop() if pooled is not None else None
    return _DensePass(attentions, grads, logits, pooled, d_pool)


def _dense_start(
    model: nn.Module, records: _DensePass, rule: str, second_order: bool = False
) -> Tensor:
    """The read-out row ``(B, N)`` the dense walk starts from: the fixed token mix of
    :func:`readout_weights`, or the attention pool's row (:func:`pool_readout`)."""
    if records.pool is not None:
        n = records.attentions[-1].shape[-1]
        return pool_readout(records.pool, records.d_pool, rule, n, constant_grad=not second_order)
    return _readout(model, records.attentions[-1])


def _run(
    choice: EngineChoice,
    model: nn.Module,
    images: Tensor,
    target: TargetLike,
    foil: TargetLike,
    differentiable: bool,
    need_grad: bool,
    chunked: Callable[[Captured], Explanation],
    dense: Callable[[], Explanation],
) -> Explanation:
    """Run the implementation of the engine ``choice`` names.

    A chunked choice runs the chunked engine's forward pass first; where that pass shows the
    records cannot be used, :meth:`EngineChoice.after_forward` falls back to the dense engine
    (or raises, for ``engine="chunked"``).

    Args:
        choice: from :func:`relreg.explain.engine.select_engine`.
        model, images, target, foil, differentiable: as for the explainer.
        need_grad: whether the method weights the attention by its gradient.
        chunked: the chunked implementation, given the records of the forward pass.
        dense: the dense implementation (runs its own forward pass).

    Returns:
        The implementation's explanation: maps ``(B, gh, gw)`` and logits ``(B, K)``.
    """
    if choice.kind == "chunked":
        capture, logits = record_blocks(
            model, images, need_grad, differentiable, choice.method, choice.keep
        )
        choice = choice.after_forward(capture)
        if choice.kind == "chunked":
            cap = capture_blocks(
                capture, logits, target, foil, need_grad, differentiable, choice.defer_gradients
            )
            return chunked(cap)
        del capture, logits  # free the unusable pass's graph before the dense one
    return dense()


def _start(model: nn.Module, cap: Captured, rule: str) -> tuple[Tensor, Tensor | None]:
    """The read-out row ``(B, N)`` the relevance walk starts from (float32 for half inputs), and
    its non-zero columns (None when all are): the only query rows the last block needs.

    A fixed token mix (:func:`readout_weights`) for CLS and average pooling; for attention
    pooling, the pool's own ``rule``-weighted attention (:func:`pool_readout`)."""
    if cap.pool is not None:
        return pool_readout(cap.pool, cap.d_pool, rule, cap.tokens).to(cap.dtype), None
    w = readout_weights(model, cap.tokens, cap.logits.device, cap.dtype)
    rows = w.nonzero().flatten()
    return w.expand(cap.logits.shape[0], -1), rows if rows.numel() < w.numel() else None


@register_explainer(
    "raw_attention",
    output="grid",
    paper="Attention weights of the last block (baseline in Chefer et al., CVPR 2021)",
)
def raw_attention(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    engine: str = "auto",
    chunk_size: int | None = None,
    defer_gradients: bool = False,
) -> Explanation:
    """Head-averaged attention of the last block, read-out row, patch columns: ``(B, gh, gw)``.

    Class-agnostic: ``target`` and ``foil`` are only validated. ``engine``, ``chunk_size`` and
    ``defer_gradients`` as for :func:`chefer`.
    """
    choice = select_engine(
        model, "raw_attention", engine, second_order, chunk_size, defer_gradients
    )
    return _run(
        choice,
        model,
        images,
        target,
        foil,
        differentiable,
        need_grad=False,
        chunked=partial(_raw_attention_chunked, model, images, differentiable, chunk_size),
        dense=partial(_raw_attention_dense, model, images, target, foil, differentiable),
    )


def _raw_attention_chunked(
    model: nn.Module, images: Tensor, differentiable: bool, chunk_size: int | None, cap: Captured
) -> Explanation:
    """:func:`raw_attention` on the chunked engine's records: the last block's read-out row."""
    with torch.set_grad_enabled(differentiable):
        r, rows = _start(model, cap, "attention")
        row = block_step(cap, cap.depth - 1, r, "attention", chunk_size, rows)
    return finish(_to_grid(model, images, row), cap.logits, differentiable)


def _raw_attention_dense(
    model: nn.Module, images: Tensor, target: TargetLike, foil: TargetLike, differentiable: bool
) -> Explanation:
    """:func:`raw_attention` on stored ``(B, h, N, N)`` attention."""
    records = _attention_pass(
        model, images, target, foil, False, differentiable, False, "raw_attention"
    )
    last = records.attentions[-1].mean(dim=1)
    row = torch.bmm(_dense_start(model, records, "attention").unsqueeze(1), last)[:, 0]
    return finish(_to_grid(model, images, row), records.logits, differentiable)


@register_explainer(
    "rollout",
    output="grid",
    paper="Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020",
)
def rollout(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    start_layer: int = 0,
    engine: str = "auto",
    chunk_size: int | None = None,
    defer_gradients: bool = False,
) -> Explanation:
    """Attention rollout from ``start_layer`` (0: all blocks; the CVPR 2021 evaluation used 1).

    Per block ``M = rownorm(mean_h A + I)``; the relevance is ``M_L ... M_s`` and its read-out row
    is returned as ``(B, gh, gw)``. Class-agnostic. ``engine``, ``chunk_size`` and
    ``defer_gradients`` as for :func:`chefer` (softmax rows sum to one, so the chunked engine uses
    ``M = (mean_h A + I) / 2``).
    """
    choice = select_engine(model, "rollout", engine, second_order, chunk_size, defer_gradients)
    return _run(
        choice,
        model,
        images,
        target,
        foil,
        differentiable,
        need_grad=False,
        chunked=partial(_rollout_chunked, model, images, differentiable, chunk_size, start_layer),
        dense=partial(_rollout_dense, model, images, target, foil, differentiable, start_layer),
    )


def _rollout_chunked(
    model: nn.Module,
    images: Tensor,
    differentiable: bool,
    chunk_size: int | None,
    start_layer: int,
    cap: Captured,
) -> Explanation:
    """:func:`rollout` on the chunked engine's records: ``r <- (r + r @ mean_h A) / 2``."""
    check_start_layer(start_layer, cap.depth)
    with torch.set_grad_enabled(differentiable):
        r, rows = _start(model, cap, "attention")
        for b in range(cap.depth - 1, start_layer - 1, -1):
            r = (r + block_step(cap, b, r, "attention", chunk_size, rows)) / 2
            rows = None
    return finish(_to_grid(model, images, r), cap.logits, differentiable)


def _rollout_dense(
    model: nn.Module,
    images: Tensor,
    target: TargetLike,
    foil: TargetLike,
    differentiable: bool,
    start_layer: int,
) -> Explanation:
    """:func:`rollout` on stored ``(B, h, N, N)`` attention."""
    records = _attention_pass(model, images, target, foil, False, differentiable, False, "rollout")
    attentions = records.attentions
    logits = records.logits
    check_start_layer(start_layer, len(attentions))
    v = _dense_start(model, records, "attention")
    for attention in reversed(attentions[start_layer:]):
        m = attention.mean(dim=1) + torch.eye(attention.shape[-1], device=v.device, dtype=v.dtype)
        m = m / m.sum(dim=-1, keepdim=True)
        v = torch.bmm(v.unsqueeze(1), m)[:, 0]
    return finish(_to_grid(model, images, v), logits, differentiable)


@register_explainer(
    "gradcam",
    output="grid",
    paper="ViT GradCAM as coded by Chefer et al., CVPR 2021 (Selvaraju et al., ICCV 2017)",
)
def gradcam(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
) -> Explanation:
    """GradCAM on the last block's attention (CVPR 2021 comparison's convention): ``(B, gh, gw)``.

    Per head, weight = mean over patch columns of the read-out row of ``dy/dA``; map =
    ``ReLU(mean_h(weight * A[readout, patches]))``. (pytorch-grad-cam's token GradCAM weights
    channels of the block's output tokens instead: a different map.)
    """
    records = _attention_pass(
        model, images, target, foil, True, differentiable, second_order, "gradcam"
    )
    logits = records.logits
    a = records.attentions[-1]
    g = records.grads[-1]
    if not second_order:
        g = g.detach()
    w = _readout(model, a)
    prefix = num_prefix_tokens(model)
    a_row = torch.einsum("bn,bhnm->bhm", w, a)[..., prefix:]
    weight = torch.einsum("bn,bhnm->bhm", w, g)[..., prefix:].mean(dim=-1, keepdim=True)
    cam = (weight * a_row).mean(dim=1).clamp(min=0)
    return finish(_patches_to_grid(model, images, cam), logits, differentiable)


@register_explainer(
    "chefer",
    output="grid",
    paper=(
        "Chefer, Gur & Wolf, Generic Attention-model Explainability, ICCV 2021 "
        "(RobustViT's rule, NeurIPS 2022)"
    ),
)
def chefer(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    start_layer: int = 0,
    gradient: str = "attention",
    engine: str = "auto",
    chunk_size: int | None = None,
    defer_gradients: bool = False,
) -> Explanation:
    """Gradient-weighted attention relevance (the RobustViT rule): ``(B, gh, gw)``, raw.

    ``Abar_b = mean_h clamp(dy/dA_b * A_b, min=0)``, ``R = prod_b (I + Abar_b)`` (later blocks on
    the left), map = read-out row of ``R``, patch columns. With ``differentiable=True`` the map
    keeps the graph through ``A`` with the gradients as constants (as RobustViT trains);
    ``second_order=True`` also differentiates through the gradients.

    ``gradient="logits"`` (a relreg variant, not the papers') weights ``A`` by the gradient with
    respect to the attention logits instead of the probabilities: ``dy/dA * A`` becomes
    ``A * (dy/dA - sum_k A_ik dy/dA_ik)``. Adding a bias to every value and removing it after the
    output projection leaves the model's function unchanged but shifts ``dy/dA`` by a constant per
    row, which moves the default map and not this one (see the robustness study in the README).

    ``engine="auto"`` (default) uses the chunked engine (:mod:`relreg.explain.chunked`: fused
    attention kept, ``chunk_size`` query rows recomputed at a time, no ``(B, heads, N, N)``
    tensor) for timm's ``Attention`` blocks and first-order maps, and the dense engine
    (``AttentionCapture``: fused attention off, every block's ``A`` and ``dy/dA`` stored) for
    ``second_order=True`` and for attention modules it cannot read (the reason logged at debug
    level, or warned when a ``chunk_size`` goes unused). ``engine="chunked"`` raises where it
    cannot be used; ``"dense"`` forces the dense engine. The choice:
    :func:`relreg.explain.engine.select_engine`.

    ``defer_gradients=True`` trades time for memory in a trainable chunked step: the maps'
    gradients with respect to each block's ``q`` and ``k`` are computed when the model's own
    backward pass reaches the block instead of waiting in autograd's buffers for it, one more
    recompute of the block's chunks (docs/results/cost.md has both figures).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> chefer(model, torch.randn(2, 3, 32, 32)).maps.shape
        torch.Size([2, 4, 4])
    """
    if gradient not in ("attention", "logits"):
        raise ValueError(f"Expected gradient 'attention' or 'logits', but got {gradient!r}.")
    choice = select_engine(model, "chefer", engine, second_order, chunk_size, defer_gradients)
    chunked = partial(
        _chefer_chunked, model, images, differentiable, chunk_size, start_layer, gradient
    )
    dense = partial(
        _chefer_dense,
        model,
        images,
        target,
        foil,
        differentiable,
        second_order,
        start_layer,
        gradient,
    )
    return _run(
        choice,
        model,
        images,
        target,
        foil,
        differentiable,
        need_grad=True,
        chunked=chunked,
        dense=dense,
    )


def _chefer_chunked(
    model: nn.Module,
    images: Tensor,
    differentiable: bool,
    chunk_size: int | None,
    start_layer: int,
    gradient: str,
    cap: Captured,
) -> Explanation:
    """:func:`chefer` on the chunked engine's records: ``r <- r + r @ Abar_b``, ``Abar_b``
    recomputed by chunks of query rows (first order: gradients held constant)."""
    check_start_layer(start_layer, cap.depth)
    rule = "chefer" if gradient == "attention" else "chefer_logits"
    with torch.set_grad_enabled(differentiable):
        r, rows = _start(model, cap, rule)
        for b in range(cap.depth - 1, start_layer - 1, -1):
            r = r + block_step(cap, b, r, rule, chunk_size, rows)
            rows = None
    return finish(_to_grid(model, images, r), cap.logits, differentiable)


def _chefer_dense(
    model: nn.Module,
    images: Tensor,
    target: TargetLike,
    foil: TargetLike,
    differentiable: bool,
    second_order: bool,
    start_layer: int,
    gradient: str,
) -> Explanation:
    """:func:`chefer` on stored ``(B, h, N, N)`` attention and gradients (also second order)."""
    records = _attention_pass(
        model, images, target, foil, True, differentiable, second_order, "chefer"
    )
    attentions = records.attentions
    grads = records.grads
    logits = records.logits
    check_start_layer(start_layer, len(attentions))
    rule = "chefer" if gradient == "attention" else "chefer_logits"
    with torch.set_grad_enabled(differentiable):
        v = _dense_start(model, records, rule, second_order)
        for b in range(len(attentions) - 1, start_layer - 1, -1):
            # take each gradient out of the list so that it is freed once used
            a = attentions[b]
            g = grads[b]
            grads[b] = None
            if gradient == "logits":  # a constant in first order, like g itself
                g = g - ((a if second_order else a.detach()) * g).sum(-1, keepdim=True)
            if second_order:
                abar = (g * a).clamp(min=0).mean(dim=1)
            else:
                abar = _PositiveGradientWeighted.apply(a, g.detach())
            del g
            v = v + torch.bmm(v.unsqueeze(1), abar)[:, 0]
    return finish(_to_grid(model, images, v), logits, differentiable)


class _PositiveGradientWeighted(torch.autograd.Function):
    """``mean_h clamp(g * a, min=0)`` for a constant gradient ``g``: ``(B, h, N, N) -> (B, N, N)``.

    Autograd would keep two ``(B, h, N, N)`` tensors per block for the backward pass (``g`` for the
    product and the product for the clamp); this keeps one, ``g`` masked where the product is
    positive and divided by the head count, which is exactly ``d abar / d a``.
    """

    @staticmethod
    def forward(ctx, a: Tensor, g: Tensor) -> Tensor:  # type: ignore[override]
        prod = g * a
        positive = prod > 0
        ctx.save_for_backward(torch.where(positive, g, 0.0).div_(a.shape[1]))
        return prod.clamp_(min=0).mean(dim=1)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return grad_out.unsqueeze(1) * weight, None
