"""The chunked relevance engine: attention relevance with timm's fused attention left on.

Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021, and RobustViT (Chefer, Schwartz & Wolf, NeurIPS 2022)
weight each block's attention probabilities ``A = softmax(q k^T * scale)`` by their gradient
``dy/dA``. Both are ``(B, heads, N, N)`` per block; the dense engine
(:class:`relreg.explain.AttentionCapture`) switches fused attention off to store them.

This engine stores neither. The forward pass runs the model's own fused kernel while
:class:`relreg.explain.capture.KernelCapture` records what each call of that kernel receives and
returns (``q`` and ``k`` after rotary embedding and qk-norm, ``v``, the additive bias or mask,
the scale and the output ``O``); one backward pass gives ``dy/dO``, and since ``O = A v``,
``dy/dA = dy/dO v^T`` with ``A = softmax(q k^T * scale + bias)``. The relevance row vector
``r: (B, N)`` then walks the blocks from the last to the first, recomputing ``A`` and ``dy/dA``
for ``chunk_size`` query rows at a time: memory ``O(B * heads * chunk_size * N)`` per block
instead of ``O(B * heads * N^2)``.

The trainable first-order path (RobustViT's: gradients held constant) is the autograd Function
:class:`_RowTimesAttention`, whose backward recomputes the same chunks and returns the gradients
of ``q``, ``k`` and of a learnable bias (BEiT's relative position bias; softmax backward
included), so a loss on the maps reaches the model's parameters through the model's own graph,
again with no stored attention.

Which models and options this engine can serve is decided by :mod:`relreg.explain.engine`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from relreg.explain._contract import (
    check_grad_mode,
    check_logits,
    graph_input,
    resolve_classes,
    score,
)
from relreg.explain.capture import BlockInput, KernelCapture, rerun_kernel_call
from relreg.validate import check_choice, check_positive_int

__all__ = [
    "RULES",
    "Captured",
    "block_step",
    "capture_blocks",
    "default_chunk_size",
    "propagate",
    "record_blocks",
    "relevance_dtype",
]

RULES = ("attention", "chefer", "chefer_logits")
# Elements of one (B, heads, chunk, N) temporary (4 MiB in float32); about four are alive at once.
# 2**22 let ViT-S at 384 px, batch 2, take half the N x N matrix per chunk: 1.20x the plain step's
# peak against 1.12x at 2**20, for +10% time (docs/results/cost.md).
_BUDGET = 2**20


class Captured(NamedTuple):
    """What the relevance pass needs, per block in forward order.

    Attributes:
        q, k, v: ``(B, heads, N, head_dim)``; ``q`` and ``k`` keep the model's graph. Under
            gradient checkpointing (``inputs`` set) the lists hold None: :func:`block_step`
            recomputes them block by block.
        bias: per block, the additive bias or boolean mask the kernel got (broadcastable to
            ``(B, heads, N, N)``; a learnable bias keeps its graph), or None.
        d_out: ``(B, heads, N, head_dim)`` gradients ``dy/dO`` (constants), or None when the
            method needs no gradient.
        scale: each block's attention scale, as the kernel used it.
        logits: ``(B, K)`` of the same forward pass.
        pool: the attention pool's probabilities ``(B, heads, L, N)`` (``global_pool="map"``),
            or None.
        d_pool: their gradient ``dy/dA_pool`` (a constant), or None.
        tokens: ``N``.
        dtype: the dtype the walk computes in (:func:`relevance_dtype`).
        inputs: per block, its recorded input (gradient checkpointing), or None.
        model: the model, for the recomputation (set with ``inputs``).
        defer_gradients: pass ``defer_gradients`` to :func:`propagate` (without ``inputs``).
    """

    q: list[Tensor | None]
    k: list[Tensor | None]
    v: list[Tensor | None]
    bias: list[Tensor | None]
    d_out: list[Tensor | None] | None
    scale: list[float]
    logits: Tensor
    pool: Tensor | None = None
    d_pool: Tensor | None = None
    tokens: int = 0
    dtype: torch.dtype = torch.float32
    inputs: list[BlockInput] | None = None
    model: nn.Module | None = None
    defer_gradients: bool = False

    @property
    def depth(self) -> int:
        """The number of blocks."""
        return len(self.scale)


def record_blocks(
    model: nn.Module,
    images: Tensor,
    need_grad: bool,
    differentiable: bool,
    method: str,
    keep: str = "tensors",
) -> tuple[KernelCapture, Tensor]:
    """The chunked engine's forward pass: fused attention kept, every kernel call recorded.

    Args:
        model: a ViT that :func:`relreg.explain.engine.select_engine` chose this engine for.
        images: ``(B, C, H, W)``.
        need_grad: whether ``dy/dO`` will be taken (gradient-weighted methods).
        differentiable: whether the maps keep the model's graph.
        method: the explainer's name, for messages.
        keep: the capture's ``keep`` (:attr:`relreg.explain.engine.EngineChoice.keep`).

    Returns:
        The exited capture (to be judged by
        :meth:`relreg.explain.engine.EngineChoice.after_forward`) and the logits ``(B, K)``.
    """
    if need_grad or differentiable:
        check_grad_mode(method)
    track = need_grad or differentiable
    x = graph_input(model, images, track)
    with torch.set_grad_enabled(track):
        with KernelCapture(model, keep=keep) as capture:
            logits = check_logits(model(x), images.shape[0])
    return capture, logits


def capture_blocks(
    capture: KernelCapture,
    logits: Tensor,
    target: object,
    foil: object,
    need_grad: bool,
    differentiable: bool,
    defer_gradients: bool = False,
) -> Captured:
    """What the relevance walk needs from a forward pass of :func:`record_blocks` whose records
    the engine choice accepted: the records, and ``dy/dO`` per block when ``need_grad``.

    Args:
        capture: the capture of that pass.
        logits: ``(B, K)`` of that pass.
        target, foil: the classes to explain (see :func:`relreg.explain.explain`).
        need_grad: take ``dy/dO`` (one backward pass that stops at the attention outputs; under
            ``keep="inputs"`` it runs down to the first block's input, and the outputs' hooks
            catch ``dy/dO`` on the way).
        differentiable: keep the graph of the forward pass for a loss on the maps.
        defer_gradients: see :func:`propagate`.
    """
    calls = [c for c in capture.calls if not c.pool]
    pool = next((c.attention for c in capture.calls if c.pool), None)
    recompute = capture.keep == "inputs"
    tgt, fl = resolve_classes(logits, target, foil)
    d_out = None
    d_pool = None
    if need_grad:
        if recompute:
            first = capture.inputs[0].args[0]
            outputs = [first] if first.requires_grad else []
        else:
            outputs = [c.out for c in calls]
        outputs += [pool] if pool is not None else []
        with torch.enable_grad():
            grads = list(
                torch.autograd.grad(
                    score(logits, tgt, fl).sum(),
                    outputs,
                    retain_graph=differentiable,
                    allow_unused=recompute,
                )
            )
        d_pool = grads.pop() if pool is not None else None
        d_out = [c.d_out for c in calls] if recompute else grads
    return Captured(
        q=[c.q for c in calls],
        k=[c.k for c in calls],
        v=[None if c.v is None else c.v.detach() for c in calls],
        bias=[c.mask for c in calls],
        d_out=d_out,
        scale=[c.scale for c in calls],
        logits=logits,
        pool=pool,
        d_pool=d_pool,
        tokens=calls[-1].queries,
        dtype=relevance_dtype_of(calls[-1].dtype),
        inputs=[capture.inputs[i] for i in range(len(calls))] if recompute else None,
        model=capture.model if recompute else None,
        defer_gradients=defer_gradients,
    )


def block_step(
    cap: Captured,
    b: int,
    r: Tensor,
    rule: str,
    chunk_size: int | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    """``r @ Abar_b`` (:func:`propagate`) for block ``b`` of the records ``cap``.

    The block's ``dy/dO`` is dropped from ``cap`` once used. Under gradient checkpointing
    (``cap.inputs``) the block's ``q``, ``k``, ``v`` and bias are recomputed from its input
    (:func:`relreg.explain.capture.rerun_kernel_call`), and where the map keeps a graph the
    step is itself checkpointed (non-reentrant), so that its backward pass recomputes them once
    more instead of holding them: per block only ``dy/dO`` stays alive.

    Args:
        cap: the records.
        b: the block index.
        r: ``(B, N)`` relevance row vectors.
        rule, chunk_size, rows: as for :func:`propagate`.

    Returns:
        ``(B, N)``.
    """
    d_out = None if cap.d_out is None else cap.d_out[b]
    if cap.d_out is not None:
        cap.d_out[b] = None
    if cap.inputs is None:
        return propagate(
            r,
            cap.q[b],
            cap.k[b],
            cap.v[b],
            d_out,
            cap.scale[b],
            rule,
            chunk_size,
            rows,
            cap.bias[b],
            cap.defer_gradients,
        )
    # checkpointed: the step's backward recomputes q and k from the block input and returns
    # their gradients at once, so there is nothing to defer
    recorded = cap.inputs[b]
    model = cap.model

    def step(r: Tensor) -> Tensor:
        call = rerun_kernel_call(model, recorded)
        v = call.v.detach()
        return propagate(r, call.q, call.k, v, d_out, call.scale, rule, chunk_size, rows, call.mask)

    out = checkpoint(step, r, use_reentrant=False) if torch.is_grad_enabled() else step(r)
    _reshard(recorded.block)
    return out


def _reshard(block: nn.Module) -> None:
    """Free the parameters an FSDP2 block gathered for its rerun (the rerun stops at the kernel
    call, before FSDP's post-forward hook would). Safe here: the rerun's graph is not kept (the
    step is checkpointed), and its recomputation in the backward pass gathers them again."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(block, FSDPModule):
        block.reshard()


def default_chunk_size(batch: int, heads: int, tokens: int) -> int:
    """Query rows per chunk: within a budget of ``2**20`` elements per ``(B, heads, chunk, N)``
    temporary (but at least 16 rows, to keep the loop short) and at most half the sequence, so
    that no ``(B, heads, N, N)`` tensor is formed."""
    rows = max(16, _BUDGET // max(batch * heads * tokens, 1))
    return max(1, min(rows, math.ceil(tokens / 2)))


def propagate(
    r: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    d_out: Tensor | None,
    scale: float,
    rule: str,
    chunk_size: int | None = None,
    rows: Tensor | None = None,
    bias: Tensor | None = None,
    defer_gradients: bool = False,
) -> Tensor:
    """``r @ Abar``: a relevance row vector times one block's head-mean weighted attention.

    ``Abar = mean_h W(A)`` with ``A = softmax(q k^T * scale + bias)`` and ``W`` by ``rule``:
    ``"attention"``: ``A``; ``"chefer"``: ``clamp(dy/dA * A, min=0)`` with ``dy/dA = d_out v^T``;
    ``"chefer_logits"``: the same with ``dy/dA`` replaced by the gradient with respect to the
    attention logits' rows, ``dy/dA - sum_k A_ik dy/dA_ik``. Gradients (``d_out``) are constants;
    ``r``, ``q`` and ``k`` are differentiable.

    Args:
        r: ``(B, N)`` relevance row vectors.
        q, k: ``(B, heads, N, head_dim)`` after qk-norm.
        v, d_out: ``(B, heads, N, head_dim)`` values and ``dy/dO`` (unused by ``"attention"``).
        scale: the attention scale.
        rule: one of :data:`RULES`.
        chunk_size: query rows per chunk (None: :func:`default_chunk_size`).
        rows: ``(R,)`` indices of the only non-zero columns of ``r``, for a constant ``r`` (the
            read-out of the last block: only the CLS row counts); None: every row.
        bias: the kernel's additive bias (float, differentiable) or boolean mask (True:
            attend), broadcastable to ``(B, heads, N, N)``; None: no bias.
        defer_gradients: compute the gradients of ``q``, ``k`` and ``bias`` when the model's
            backward pass reaches them rather than in this step's backward (:class:`_Deferred`):
            two ``(B, heads, N, head_dim)`` tensors fewer waiting in autograd's buffers per
            block, for one more recompute of the chunks.

    Returns:
        ``(B, N)``, in float32 when the inputs are half precision, else in their dtype.
    """
    check_choice("rule", rule, RULES)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    b, h, n, _ = q.shape
    chunk = chunk_size or default_chunk_size(b, h, n)
    if rows is not None and r.requires_grad:
        raise ValueError("Expected rows=None for a relevance vector r that requires grad.")
    if rule == "attention":
        v = d_out = q.new_zeros(())
    elif not isinstance(v, Tensor) or not isinstance(d_out, Tensor):
        raise TypeError(
            f"Expected tensors v and d_out for rule {rule!r}, but got {type(v).__name__} and "
            f"{type(d_out).__name__}."
        )
    bias4 = None if bias is None else bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
    deferred = None
    if defer_gradients and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        deferred = _Deferred({"q": q, "k": k, "bias": bias})
    return _RowTimesAttention.apply(
        r, q, k, v.detach(), d_out.detach(), scale, rule, chunk, rows, bias4, deferred
    )


def relevance_dtype(t: Tensor) -> torch.dtype:
    """The dtype the engine computes in for inputs like ``t``: float32 for half precision."""
    return relevance_dtype_of(t.dtype)


def relevance_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """:func:`relevance_dtype` for a dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(n: int, chunk: int, rows: Tensor | None) -> list[slice | Tensor]:
    if rows is None:
        return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    return list(rows.split(chunk))


def _weights(
    qs: Tensor,
    k: Tensor,
    v: Tensor,
    d_out: Tensor,
    rule: str,
    idx: slice | Tensor,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``A`` and ``W(A)``, ``(B, heads, chunk, N)``, for the query rows ``idx`` (contiguous
    inputs; ``qs = q * scale``, scaled once per call rather than every chunk's logits: a
    ``(B, heads, N, head_dim)`` product instead of a pass over ``(B, heads, N, N)``; ``bias``
    4-d and broadcastable)."""
    logits = qs[:, :, idx] @ k.transpose(-2, -1)
    if bias is not None:
        rows = bias[:, :, idx] if bias.shape[2] > 1 else bias
        if rows.dtype == torch.bool:
            logits.masked_fill_(~rows, float("-inf"))
        else:
            logits += rows.to(logits.dtype)
    a = torch.softmax(logits, dim=-1)
    if rule == "attention":
        return a, a
    g = d_out[:, :, idx] @ v.transpose(-2, -1)
    if rule == "chefer_logits":
        g -= (a * g).sum(dim=-1, keepdim=True)
    return a, g.mul_(a).clamp_(min=0)


def _head_sum(r: Tensor, w: Tensor) -> Tensor:
    """``sum_h r @ w[:, h]``: ``(B, c)`` and ``(B, heads, c, N)`` to ``(B, N)``, as one bmm."""
    b, h, c, n = w.shape
    return torch.bmm(r.repeat(1, h).unsqueeze(1), w.reshape(b, h * c, n))[:, 0]


class _RowTimesAttention(torch.autograd.Function):
    """``r @ mean_h W(softmax(q k^T * scale))`` by chunks of query rows; see :func:`propagate`.

    The backward uses ``dW/dA * A = W`` (``W = clamp(g A, 0)`` with ``g`` constant; ``W = A``
    for ``"attention"``), so with ``u = W @ grad`` per head the gradient of the attention logits
    of row ``i`` is ``r_i (W_i * grad - A_i u_i) / heads``: no ``(B, heads, N, N)`` tensor and
    no stored attention, only the recomputed chunk.
    """

    @staticmethod
    def forward(ctx, r, q, k, v, d_out, scale, rule, chunk, rows, bias, deferred):  # type: ignore[override]
        # saved first: a checkpointed step (block_step) recomputes up to here, not the loop
        empty = torch.empty(0)
        ctx.save_for_backward(
            r,
            q,
            k,
            v,
            d_out,
            rows if rows is not None else empty,
            bias if bias is not None else empty,
        )
        ctx.scale = scale
        ctx.rule = rule
        ctx.chunk = chunk
        ctx.has_rows = rows is not None
        ctx.has_bias = bias is not None
        ctx.deferred = deferred
        dtype = relevance_dtype(q)
        heads = q.shape[1]
        with torch.autocast(q.device.type, enabled=False):
            r_, k_, v_, d_ = (t.to(dtype).contiguous() for t in (r, k, v, d_out))
            qs = q.to(dtype) * scale
            out = r_.new_zeros(r.shape)
            for idx in _chunks(q.shape[2], chunk, rows):
                w = _weights(qs, k_, v_, d_, rule, idx, bias)[1]
                out += _head_sum(r_[:, idx], w)
        return out.div_(heads)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        r, q, k, v, d_out, rows, bias = ctx.saved_tensors
        saved = _Saved(
            r,
            q,
            k,
            v,
            d_out,
            rows if ctx.has_rows else None,
            bias if ctx.has_bias else None,
            ctx.scale,
            ctx.rule,
            ctx.chunk,
        )
        need_r, need_q, need_k = ctx.needs_input_grad[:3]
        need_bias = ctx.needs_input_grad[9]
        deferred = ctx.deferred
        if deferred is not None and (need_q or need_k or need_bias):
            # the gradients of q, k and the bias are computed when the model's backward pass
            # reaches them (_Deferred's hooks); only r's gradient now
            deferred.arm(saved, grad_out, need_q, need_k, need_bias)
            dr = _gradients(saved, grad_out, True, False, False, False)[0] if need_r else None
            # zeros that take no memory, so that the hooks always find a gradient to add to
            dq, dk, db = (
                _no_grad(t, need) for t, need in ((q, need_q), (k, need_k), (bias, need_bias))
            )
            return (dr, dq, dk, None, None, None, None, None, None, db, None)
        dr, dq, dk, db = _gradients(saved, grad_out, need_r, need_q, need_k, need_bias)
        return (dr, dq, dk, None, None, None, None, None, None, db, None)


def _no_grad(t: Tensor, need: bool) -> Tensor | None:
    return t.new_zeros(()).expand(t.shape) if need else None


class _Saved(NamedTuple):
    """The inputs of one :class:`_RowTimesAttention` call, as its backward needs them."""

    r: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    d_out: Tensor
    rows: Tensor | None
    bias: Tensor | None
    scale: float
    rule: str
    chunk: int


def _gradients(
    s: _Saved, grad_out: Tensor, need_r: bool, need_q: bool, need_k: bool, need_bias: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``r``, ``q``, ``k`` and the bias of one call (None where not needed)."""
    dtype = relevance_dtype(s.q)
    heads = s.q.shape[1]
    scale = s.scale
    bias = s.bias
    with torch.autocast(s.q.device.type, enabled=False):
        r_, k_, v_, d_ = (t.to(dtype).contiguous() for t in (s.r, s.k, s.v, s.d_out))
        qs = s.q.to(dtype) * scale  # the logits' q (see _weights)
        go = (grad_out.to(dtype) / heads)[:, None, None, :]  # (B, 1, 1, N)
        dr = torch.zeros_like(r_) if need_r else None
        dq = torch.zeros_like(qs) if need_q else None
        dk = torch.zeros_like(k_) if need_k else None
        db = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_bias else None
        for idx in _chunks(s.q.shape[2], s.chunk, s.rows):
            a, w = _weights(qs, k_, v_, d_, s.rule, idx, bias)
            wg = a * go if w is a else w.mul_(go)  # W * grad, (B, heads, c, N)
            u = wg.sum(dim=-1, keepdim=True)  # W @ grad, (B, heads, c, 1)
            if need_r:
                dr[:, idx] = u.sum(dim=1)[..., 0]
            if not (need_q or need_k or need_bias):
                continue
            ds = wg.sub_(a.mul_(u))  # dL/dS divided by r_i, (B, heads, c, N)
            if need_bias:
                _add_bias_grad(db, ds * r_[:, None, idx, None], idx)
            rc = r_[:, None, idx, None]  # (B, 1, c, 1)
            if need_q:
                dq[:, :, idx] = (ds @ k_).mul_(rc * scale)
            if need_k:
                dk += ds.transpose(-2, -1) @ (qs[:, :, idx] * rc)  # qs holds the scale
    return _cast(dr, s.r), _cast(dq, s.q), _cast(dk, s.k), _cast(db, bias)


class _Deferred:
    """The q, k and bias gradients of one :class:`_RowTimesAttention` call, computed late.

    Autograd runs the relevance walk's backward before the model's (the walk's nodes are newer,
    and the walk's last block needs every earlier block's gradient), so gradients it returns for
    ``q`` and ``k`` wait in autograd's buffers, two ``(B, heads, N, head_dim)`` tensors per
    block, until the model's backward pass reaches that block. Deferred, the walk's backward
    returns ``r``'s gradient only and keeps its inputs (``dy/dO`` the one tensor the model's graph
    does not hold anyway); a hook on ``q``, ``k`` and the bias adds their gradients when autograd
    has theirs from the model, recomputing the block's chunks once more.
    """

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.saved: _Saved | None = None
        self.grad_out: Tensor | None = None
        self.ready: dict[str, Tensor | None] = {}
        self.handles = []
        self.shapes = {role: t.shape for role, t in tensors.items() if t is not None}
        for role, t in tensors.items():
            if t is not None and t.requires_grad:
                self.handles.append(t.register_hook(self._hook(role)))

    def arm(self, saved: _Saved, grad_out: Tensor, need_q: bool, need_k: bool, need_b: bool):
        self.saved, self.grad_out = saved, grad_out
        self.need = {"q": need_q, "k": need_k, "bias": need_b}
        self.ready = {}

    def _hook(self, role: str):
        def hook(grad: Tensor) -> Tensor | None:
            if self.saved is None and role not in self.ready:
                return None  # a backward pass that did not go through the map
            if role not in self.ready:
                n = self.need
                _, dq, dk, db = _gradients(
                    self.saved, self.grad_out, False, n["q"], n["k"], n["bias"]
                )
                self.ready = {"q": dq, "k": dk, "bias": db}
                self.saved = self.grad_out = None
            mine = self.ready.pop(role, None)
            if mine is None:
                return None
            return grad + mine.reshape(self.shapes[role])

        return hook


def _cast(t: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(like.dtype)


def _add_bias_grad(db: Tensor, ds: Tensor, idx: slice | Tensor) -> None:
    """Add the logits' gradient ``ds`` ``(B, heads, c, N)`` of the query rows ``idx`` to the
    bias gradient ``db``, summed over the dimensions the bias broadcasts over."""
    dims = [d for d in (0, 1) if db.shape[d] == 1 and ds.shape[d] > 1]
    part = ds.sum(dim=dims, keepdim=True) if dims else ds
    if db.shape[2] == 1:
        db += part.sum(dim=2, keepdim=True)
    else:
        db[:, :, idx] += part
