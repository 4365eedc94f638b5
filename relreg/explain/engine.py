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
- **chunked** (:mod:`relreg.explain.chunked`): timm's fused kernel kept, only ``q``, ``k``, ``v``
  and the attention output recorded, ``A`` and ``dy/dA`` recomputed ``chunk_size`` query rows at
  a time, memory ``O(B * heads * chunk_size * N)`` per block. First order only, and only for
  timm's own ``Attention.forward``, each module called once per forward pass, without a mask.

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

from relreg.explain.capture import QKVCapture, find_attention_modules
from relreg.validate import check_choice, check_positive_int

__all__ = ["ENGINES", "EngineChoice", "select_engine"]

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
    """

    kind: str
    reason: str
    engine: str = "auto"
    method: str = ""
    model: str = ""
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_choice("engine", self.engine, ENGINES)

    def after_forward(self, capture: QKVCapture) -> EngineChoice:
        """The choice once the chunked engine's forward pass has run under ``capture``.

        Args:
            capture: the (exited) :class:`relreg.explain.capture.QKVCapture` of that pass.

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
) -> EngineChoice:
    """Choose the relevance engine before any forward pass.

    Args:
        model: the model to explain (a timm ViT, or a model listing its attention modules).
        method: the explainer's name, for messages (e.g. ``"chefer"``).
        engine: ``"auto"``, ``"chunked"`` or ``"dense"``.
        second_order: whether the maps are differentiated through the attention gradients too.
        chunk_size: query rows per chunk for the chunked engine (None: its default).

    Returns:
        The choice. A chunked choice still has to pass :meth:`EngineChoice.after_forward`.

    Raises:
        ValueError: for an unknown ``engine``, a ``chunk_size`` that is not an int >= 1, a model
            without attention modules (unless ``engine="dense"``), and for ``engine="chunked"``
            where the chunked engine cannot run (``second_order=True``, an unreadable model).
    """
    check_choice("engine", engine, ENGINES)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    choice = EngineChoice("chunked", "", engine, method, type(model).__name__, chunk_size)
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
    return replace(choice, reason=f"engine={engine!r}: timm attention, first order")


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


def _model_problem(model: nn.Module, modules: list[nn.Module]) -> str | None:
    """Why the chunked engine cannot read ``model``, known before a forward pass; None: it can."""
    for m in model.modules():
        if getattr(m, "grad_checkpointing", False):
            return "gradient checkpointing is on (blocks rerun in the backward pass)"
        if getattr(m, "_compiled_call_impl", None) is not None:
            return f"a submodule ({type(m).__name__}) is compiled (hooks do not run eagerly)"
    for i, m in enumerate(modules):
        reason = _module_problem(m)
        if reason is not None:
            return f"attention module {i}: {reason}"
    return None


def _module_problem(module: nn.Module) -> str | None:
    """Why the chunked engine cannot read attention ``module``, or None when it can.

    The engine reads the tensors of timm's own ``Attention.forward`` (``q``/``k`` after qk-norm,
    ``v`` from ``qkv``, the attention output entering ``norm``); any other forward (a subclass
    that overrides it, EVA's rotary attention, a patched method) or an active attention dropout
    (random, so not recomputable) needs the dense engine.
    """
    from timm.layers import Attention

    forward = getattr(type(module), "forward", None)
    if forward is not Attention.forward or "forward" in vars(module):
        return f"{type(module).__name__}.forward is not timm's Attention.forward"
    if module.training and float(getattr(module.attn_drop, "p", 0.0)) > 0:
        return f"attention dropout is active (p={module.attn_drop.p})"
    return None


def _forward_problem(capture: QKVCapture) -> str | None:
    """Why the records of a forward pass cannot be used, or None when they can: every module must
    have been called exactly once, without an attention mask or causal flag."""
    if capture.masked:
        return f"attention module {capture.masked[0]} got an attention mask or is_causal"
    for i, counts in enumerate(capture.counts()):
        if counts != (1, 1, 1, 1):
            return f"attention module {i} ran {max(counts)} times in one forward pass"
    return None
