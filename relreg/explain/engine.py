"""Which relevance engine runs an attention explainer, decided in one place.

Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention Visualization", CVPR 2021, and
"Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers", ICCV 2021 (the rule RobustViT, Chefer, Schwartz & Wolf, NeurIPS 2022, trains with)
read each block's attention probabilities ``A = softmax(q k^T * scale)``, ``(B, heads, N, N)``,
and weight them by their gradient ``dy/dA``. relreg has two engines for this:

- **dense** (:class:`relreg.explain.AttentionCapture`): fused attention switched off, every
  block's ``A`` (and ``dy/dA``) stored, memory ``O(B * heads * N^2)`` per block. It reads any
  module that passes its probabilities through ``attn_drop`` (and models that hand them over
  themselves, e.g. :class:`relreg.explain.HuggingFaceViT`) and has second derivatives.
- **chunked** (:mod:`relreg.explain.chunked`): the fused kernel kept, what each call of
  ``F.scaled_dot_product_attention`` receives and returns recorded
  (:class:`relreg.explain.capture.KernelCapture`), ``A`` and ``dy/dA`` recomputed ``chunk_size``
  query rows at a time, memory ``O(B * heads * chunk_size * N)`` per block. First order only.
  Its scope is full-token self-attention with one kernel call per residual block, any additive
  bias or boolean mask included: timm's Attention, EvaAttention and AttentionRope (EVA-02,
  DINOv3-style rotary ViTs, RoPE-ViT, PE), BEiT's relative position bias, NaFlexViT's padding
  mask, a user's own block of that kind, with non-reentrant gradient checkpointing on or off.
  An attention-pool read-out (SigLIP's ``global_pool="map"``) is read at its own kernel call.

:func:`select_engine` decides before any forward pass everything the model and the options tell;
:meth:`EngineChoice.after_forward` decides what only the forward pass shows (a module called
twice, an attention mask). This module is the only place that knows what the chunked engine
supports. ``engine="chunked"`` raises ``ValueError`` where it cannot run; ``engine="auto"``
falls back to the dense engine and reports why once per choice: one debug line on this module's
logger, or a ``UserWarning`` when a ``chunk_size`` was asked for (it then goes unused);
``engine="dense"`` always runs the dense engine.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, replace

from torch import nn

from relreg.explain.capture import (
    KEEP,
    KernelCapture,
    find_attention_modules,
    kernel_blocks,
)
from relreg.validate import check_bool, check_choice, check_positive_int

__all__ = ["ENGINES", "EngineChoice", "is_checkpointing", "select_engine"]

log = logging.getLogger(__name__)

ENGINES = ("auto", "chunked", "dense")
KINDS = ("chunked", "dense")


@dataclass(frozen=True)
class EngineChoice:
    """The engine an attention explainer runs on, and why.

    Attributes:
        kind: the engine that runs, ``"chunked"`` or ``"dense"``.
        reason: why, in words; for a fall-back, what the chunked engine cannot read.
        engine: the engine asked for, one of :data:`ENGINES`.
        method: the explainer's name (for messages).
        model: the model's class name (for messages).
        chunk_size: query rows per chunk for the chunked engine (None: its default).
        keep: what the chunked engine's capture keeps per block (see
            :class:`relreg.explain.capture.KernelCapture`): ``"tensors"`` (``q``, ``k``, ``v``
            and ``O``, which the model's own graph holds anyway), or ``"inputs"`` under gradient
            checkpointing, whose point is not to hold them: each block's input is kept and its
            ``q``, ``k``, ``v`` recomputed block by block in the relevance walk (and again, for a
            trainable map, in its backward pass).
        defer_gradients: whether the chunked engine computes a trainable map's ``q`` and ``k``
            gradients when the model's backward pass reaches each block
            (:func:`relreg.explain.chunked.propagate`): less memory at the peak, one more
            recompute of the attention chunks per block (no effect under ``keep="inputs"``).
    """

    kind: str
    reason: str
    engine: str = "auto"
    method: str = ""
    model: str = ""
    chunk_size: int | None = None
    keep: str = "tensors"
    defer_gradients: bool = False

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_choice("keep", self.keep, KEEP)
        check_choice("engine", self.engine, ENGINES)

    def after_forward(self, capture: KernelCapture) -> EngineChoice:
        """The choice once the chunked engine's forward pass has run under ``capture``.

        Args:
            capture: the (exited) :class:`relreg.explain.capture.KernelCapture` of that pass.

        Returns:
            This choice when the records can be used (or when it is not a chunked choice);
            else, for ``engine="auto"``, a dense choice with the reason, reported once.

        Raises:
            ValueError: for ``engine="chunked"`` when the records cannot be used.
        """
        if self.kind != "chunked":
            return self
        reason = _forward_problem(capture)
        return self if reason is None else _fall_back(self, reason)


def select_engine(
    model: nn.Module,
    method: str,
    engine: str = "auto",
    second_order: bool = False,
    chunk_size: int | None = None,
    defer_gradients: bool = False,
) -> EngineChoice:
    """Choose the relevance engine before any forward pass.

    Args:
        model: the model to explain (a timm ViT, or a model listing its attention modules).
        method: the explainer's name, for messages (e.g. ``"chefer"``).
        engine: ``"auto"``, ``"chunked"`` or ``"dense"``.
        second_order: whether the maps are differentiated through the attention gradients too.
        chunk_size: query rows per chunk for the chunked engine (None: its default).
        defer_gradients: see :attr:`EngineChoice.defer_gradients`.

    Returns:
        The choice. A chunked choice still has to pass :meth:`EngineChoice.after_forward`.

    Raises:
        ValueError: for an unknown ``engine``, a ``chunk_size`` that is not an int >= 1, a model
            without attention modules or a hierarchical window model (Swin) (unless
            ``engine="dense"``, whose capture then raises), reentrant gradient checkpointing or a
            submodule compiled in place under checkpointing (any engine), and for
            ``engine="chunked"`` where the chunked engine cannot run (``second_order=True``, an
            unreadable model).
    """
    check_choice("engine", engine, ENGINES)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    check_bool("defer_gradients", defer_gradients)
    if _reentrant_checkpointing(model):
        raise ValueError(
            "Expected non-reentrant gradient checkpointing (timm's default), but "
            "TIMM_REENTRANT_CKPT is set: reentrant checkpointing runs the blocks' forward pass "
            "without a graph, so q, k and the attention maps have none to differentiate; unset "
            "TIMM_REENTRANT_CKPT or turn checkpointing off (model.set_grad_checkpointing(False))."
        )
    compiled = _compiled_in_place(model)
    if compiled is not None and is_checkpointing(model):
        raise ValueError(
            "Expected no submodule compiled in place (module.compile()) under gradient "
            f"checkpointing, but {compiled} is: the explainers run it eagerly, while the "
            "checkpoint's recomputation in the backward pass would run its compiled graph, which "
            "saves other tensors; compile the whole model instead (torch.compile(model), "
            "explained through its original module) or turn checkpointing off."
        )
    choice = EngineChoice(
        "chunked", "", engine, method, type(model).__name__, chunk_size, "tensors", defer_gradients
    )
    if engine == "dense":
        return replace(choice, kind="dense", reason="engine='dense' asked for")
    if second_order:
        if engine == "chunked":
            raise ValueError(
                "Expected engine 'auto' or 'dense' with second_order=True (the chunked engine is "
                "first-order: gradients held constant), but got engine='chunked'."
            )
        return _fall_back(choice, "second_order=True needs second derivatives")
    reason = _model_problem(model, find_attention_modules(model))
    if reason is not None:
        return _fall_back(choice, reason)
    why = _recompute_reason(model)
    if why is not None:
        return replace(
            choice,
            keep="inputs",
            reason=f"engine={engine!r}: attention read at the kernel call, recomputed from each "
            f"block's input ({why})",
        )
    return replace(choice, reason=f"engine={engine!r}: attention read at the kernel call")


def _recompute_reason(model: nn.Module) -> str | None:
    """Why the chunked capture should keep each block's input rather than the kernel's tensors
    (:attr:`EngineChoice.keep`), or None: under gradient checkpointing (holding ``q``, ``k``,
    ``v`` would undo it), and where each block computes its own learned attention bias (BEiT's
    relative position bias, ``(heads, N, N)`` per block, which the model's graph does not keep
    and the relevance pass would)."""
    if is_checkpointing(model):
        return "gradient checkpointing"
    for block in kernel_blocks(model) or []:
        for name, _ in block.named_parameters():
            if "relative_position_bias" in name:
                return "a relative position bias computed in every block"
    return None


def _fall_back(choice: EngineChoice, reason: str) -> EngineChoice:
    """The dense choice for ``reason``, reported once; raises for ``engine="chunked"``."""
    if choice.engine == "chunked":
        raise ValueError(
            f"Expected a model the chunked engine can read (engine='chunked'), but {reason}; "
            "use engine='auto' or 'dense'."
        )
    dense = replace(choice, kind="dense", reason=reason)
    message = f"{dense.method}: dense relevance engine for {dense.model} ({reason})"
    if dense.chunk_size is not None:  # memory asked for and not delivered: said
        warnings.warn(
            f"{message}; chunk_size={dense.chunk_size} is not used.",
            UserWarning,
            stacklevel=_caller_outside_relreg(),
        )
    else:
        log.debug(message)
    return dense


def _caller_outside_relreg() -> int:
    """``stacklevel`` for a warning issued by :func:`_fall_back`: the first frame outside relreg.

    What ``warnings.warn(skip_file_prefixes=...)`` does on Python 3.12+, whatever the depth of
    the call inside relreg.
    """
    frame = sys._getframe(1)  # _fall_back, stacklevel 1
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "relreg":
        frame = frame.f_back
        level += 1
    return level


def _compiled_in_place(model: nn.Module) -> str | None:
    """The class name of a submodule of ``model`` compiled in place (``module.compile()``), or
    None."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            return type(m).__name__
    return None


def is_checkpointing(model: nn.Module) -> bool:
    """Whether a module of ``model`` checkpoints its blocks (timm's ``grad_checkpointing`` flag,
    transformers' ``gradient_checkpointing``)."""
    names = ("grad_checkpointing", "gradient_checkpointing")
    return any(getattr(m, name, False) is True for m in model.modules() for name in names)


def _reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether a module of ``model`` checkpoints its blocks in timm's reentrant form."""
    from timm.layers import config

    return is_checkpointing(model) and bool(getattr(config, "_USE_REENTRANT_CKPT", False))


def _model_problem(model: nn.Module, modules: list[nn.Module]) -> str | None:
    """Why the chunked engine cannot read ``model``, known before a forward pass; None: it can.

    Args:
        model: the model.
        modules: its attention modules (:func:`find_attention_modules`).
    """
    blocks = kernel_blocks(model)
    if blocks is None:
        return (
            f"{type(model).__name__} has no list of blocks (model.blocks) to attribute the "
            "attention kernel's calls to"
        )
    for i, m in enumerate(modules):
        drop = getattr(m, "attn_drop", None)
        if m.training and float(getattr(drop, "p", 0.0)) > 0:
            return f"attention module {i}: attention dropout is active (p={drop.p})"
    return None


def _forward_problem(capture: KernelCapture) -> str | None:
    """Why the records of a forward pass cannot be used, or None when they can: every block must
    have called the kernel exactly once, for self-attention over the whole sequence, without
    dropout or a causal flag, with a graph when the pass kept one; the attention pool (if any)
    at most once."""
    for call in capture.calls:
        if call.block is None and not call.pool:
            return "the attention kernel was called outside the model's blocks"
    pool_calls = sum(call.pool for call in capture.calls)
    if pool_calls > 1:
        return f"the attention pool called the attention kernel {pool_calls} times"
    per_block: list[list] = [[] for _ in capture.blocks]
    for call in capture.calls:
        if call.block is not None:
            per_block[call.block].append(call)
    for i, calls in enumerate(per_block):
        reason = _block_problem(calls, capture.grad_enabled)
        if reason is not None:
            return f"block {i}: {reason}"
    return None


def _block_problem(calls: list, grad_enabled: bool) -> str | None:
    """Why one block's kernel calls cannot be used, or None."""
    if not calls:
        return (
            "made no call of F.scaled_dot_product_attention (its attention is computed another way)"
        )
    if len(calls) > 1:
        return f"called the attention kernel {len(calls)} times in one forward pass"
    call = calls[0]
    if call.queries != call.keys:
        return f"its attention is not self-attention ({call.queries} queries, {call.keys} keys)"
    if call.is_causal:
        return "the attention kernel got is_causal=True"
    if call.dropout_p > 0:
        return f"attention dropout is active (p={call.dropout_p})"
    if grad_enabled and not call.graph:
        return "q has no graph (the block ran without gradients, e.g. reentrant checkpointing)"
    return None
