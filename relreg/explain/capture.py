"""Capture the attention probabilities of a timm ViT, for one call, without changing the model.

timm's ``Attention`` computes ``softmax(q k^T * scale)`` and passes it through ``attn_drop``
unless ``fused_attn`` is on, in which case the probabilities never exist as a tensor. The
:class:`AttentionCapture` context manager switches ``fused_attn`` off on every attention module,
records the post-softmax, pre-dropout probabilities ``A: (B, heads, N, N)`` with a forward
pre-hook on ``attn_drop`` (the tensor RobustViT and Chefer et al. differentiate), and on exit,
also after an error, removes every hook and restores every flag (the dense engine).

:class:`QKVCapture` leaves fused attention on and records only what the fused kernel keeps: ``q``
and ``k`` after qk-norm, ``v`` and the attention output, for the chunked engine
(:mod:`relreg.explain.chunked`; :mod:`relreg.explain.engine` says when it can be used).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import TracebackType

from torch import Tensor, nn

__all__ = [
    "AttentionCapture",
    "QKVCapture",
    "find_attention_modules",
    "unfused_attention",
]

_REQUIRED = ("qkv", "attn_drop", "fused_attn", "num_heads")


def _is_timm_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in _REQUIRED) and isinstance(
        module.attn_drop, nn.Module
    )


def find_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules of ``model`` in forward (registration) order.

    A module counts when it has timm's ``Attention`` interface: ``qkv``, ``attn_drop``,
    ``fused_attn`` and ``num_heads``. A model that lists its own (``model.attention_modules()``,
    e.g. :class:`relreg.explain.HuggingFaceViT`) is asked instead.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if the model has no such module (a CNN, or a ViT not built from timm blocks).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}.")
    own = getattr(model, "attention_modules", None)
    if callable(own):
        return list(own())
    found = [m for m in model.modules() if _is_timm_attention(m)]
    if not found:
        raise ValueError(
            f"Expected a timm ViT with attention modules (timm's Attention: attributes "
            f"{', '.join(_REQUIRED)}), but found none in {type(model).__name__}. Attention-based "
            "explainers need such blocks; gradient explainers (saliency, input_x_gradient, "
            "smoothgrad, integrated_gradients) work on any differentiable classifier."
        )
    return found


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Switch ``fused_attn`` off on every timm attention module of ``model`` for the block.

    Needed for double backward (``create_graph=True`` through attention): PyTorch's fused
    scaled-dot-product kernels have no second derivative. A model without timm attention is left
    alone. Flags are restored on exit, also after an error.

    Yields:
        The attention modules found (possibly none).
    """
    modules = [m for m in model.modules() if _is_timm_attention(m)]
    flags = [m.fused_attn for m in modules]
    try:
        for m in modules:
            m.fused_attn = False
        yield modules
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.fused_attn = flag


class _HookContext:
    """Context-manager plumbing shared by the captures: on entry the subclass registers its hooks
    (and flag changes) into an ``ExitStack`` kept in ``_stack``; exit, also after an error, undoes
    them all."""

    _stack: ExitStack | None = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack = self._stack
        self._stack = None
        if stack is not None:
            stack.close()


class AttentionCapture(_HookContext):
    """Context manager that records every block's attention probabilities during forward passes.

    Args:
        model: a timm ViT (any module containing timm ``Attention`` blocks).

    Attributes:
        attentions: list of ``(B, heads, N, N)`` tensors, one per attention module, in forward
            order, for the forward passes run inside the context (call :meth:`clear` between them).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> with AttentionCapture(model) as cap:
        ...     _ = model(torch.randn(2, 3, 32, 32))
        >>> len(cap.attentions), tuple(cap.attentions[0].shape)
        (12, (2, 3, 17, 17))
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = find_attention_modules(model)
        self.attentions: list[Tensor] = []
        self._stack: ExitStack | None = None

    def __enter__(self) -> AttentionCapture:
        if self._stack is not None:
            raise RuntimeError("AttentionCapture is not re-entrant: exit it before entering again.")
        self.attentions = []
        with ExitStack() as stack:
            record = getattr(self.model, "record_attention", None)
            if callable(record):
                stack.enter_context(record(self._store))
            else:
                stack.enter_context(unfused_attention(self.model))
                for module in self.modules:
                    stack.callback(module.attn_drop.register_forward_pre_hook(self._record).remove)
            self._stack = stack.pop_all()
        return self

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.attentions)

    def clear(self) -> None:
        """Forget the recorded attention maps (before another forward pass)."""
        self.attentions = []

    def _record(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.attentions.append(args[0])

    def _store(self, attention: Tensor) -> None:
        self.attentions.append(attention)


class QKVCapture(_HookContext):
    """Context manager that records what the fused attention kernel itself keeps, per block.

    Fused attention (``F.scaled_dot_product_attention``) stays on and no model flag changes. For
    every attention module the hooks record, in forward order:

    - ``q``, ``k``: ``(B, heads, N, head_dim)`` after qk-norm (outputs of ``q_norm`` / ``k_norm``);
    - ``v``: ``(B, heads, N, head_dim)``, read from the output of ``qkv``;
    - ``out``: ``(B, N, heads * head_dim)``, the attention output entering ``norm`` (before the
      output projection); its gradient is ``dy/dO``.

    Only modules running timm's own ``Attention.forward`` can be read this way. The capture only
    records; whether the records can be used (every module called once, without a mask) is
    judged by :meth:`relreg.explain.engine.EngineChoice.after_forward` from :attr:`masked` and
    :meth:`counts`.

    Args:
        model: a timm ViT.
        modules: its attention modules (:func:`find_attention_modules`).

    Attributes:
        masked: indices of the modules called with an attention mask or ``is_causal``, one entry
            per such call, in call order.
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module]) -> None:
        self.model = model
        self.modules = modules
        self.q: list[list[Tensor]] = []
        self.k: list[list[Tensor]] = []
        self.v: list[list[Tensor]] = []
        self.out: list[list[Tensor]] = []
        self.masked: list[int] = []
        self._stack: ExitStack | None = None

    def __enter__(self) -> QKVCapture:
        if self._stack is not None:
            raise RuntimeError("QKVCapture is not re-entrant: exit it before entering again.")
        n = len(self.modules)
        self.q, self.k, self.v, self.out = ([[] for _ in range(n)] for _ in range(4))
        self.masked = []
        with ExitStack() as stack:
            for i, m in enumerate(self.modules):
                hooks = (
                    m.register_forward_pre_hook(self._call_hook(i), with_kwargs=True),
                    m.q_norm.register_forward_hook(self._output_hook(self.q[i])),
                    m.k_norm.register_forward_hook(self._output_hook(self.k[i])),
                    m.qkv.register_forward_hook(self._value_hook(m, self.v[i])),
                    m.norm.register_forward_pre_hook(self._input_hook(self.out[i])),
                )
                for handle in hooks:
                    stack.callback(handle.remove)
            self._stack = stack.pop_all()
        return self

    def counts(self) -> list[tuple[int, int, int, int]]:
        """How many ``(q, k, v, out)`` tensors each attention module recorded, in forward order
        (``(1, 1, 1, 1)`` per module for one forward pass)."""
        return [
            (len(q), len(k), len(v), len(o))
            for q, k, v, o in zip(self.q, self.k, self.v, self.out, strict=True)
        ]

    def blocks(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(q, k, v, out)`` per attention module, in forward order (see the class docstring)."""
        return [
            (q[0], k[0], v[0], o[0])
            for q, k, v, o in zip(self.q, self.k, self.v, self.out, strict=True)
        ]

    def _call_hook(self, index: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if len(args) > 1 or kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
                self.masked.append(index)

        return hook

    @staticmethod
    def _output_hook(records: list[Tensor]):  # noqa: ANN205
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            records.append(output)

        return hook

    @staticmethod
    def _input_hook(records: list[Tensor]):  # noqa: ANN205
        def hook(module: nn.Module, args: tuple) -> None:
            records.append(args[0])

        return hook

    @staticmethod
    def _value_hook(attention: nn.Module, records: list[Tensor]):  # noqa: ANN205
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            b, n = output.shape[:2]
            heads = attention.num_heads
            v = output.reshape(b, n, 3, heads, output.shape[-1] // (3 * heads))[:, :, 2]
            records.append(v.transpose(1, 2))

        return hook
