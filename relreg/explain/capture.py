"""Capture the attention probabilities of a timm ViT, for one call, without changing the model.

timm's ``Attention`` computes ``softmax(q k^T * scale)`` and passes it through ``attn_drop``
unless ``fused_attn`` is on, in which case the probabilities never exist as a tensor. The
:class:`AttentionCapture` context manager switches ``fused_attn`` off on every attention module,
records the post-softmax, pre-dropout probabilities ``A: (B, heads, N, N)`` with a forward
pre-hook on ``attn_drop`` (the tensor RobustViT and Chefer et al. differentiate), and on exit,
also after an error, removes every hook and restores every flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import TracebackType

from torch import Tensor, nn

__all__ = ["AttentionCapture", "find_attention_modules", "unfused_attention"]

_REQUIRED = ("qkv", "attn_drop", "fused_attn", "num_heads")


def _is_timm_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in _REQUIRED) and isinstance(
        module.attn_drop, nn.Module
    )


def find_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules of ``model`` in forward (registration) order.

    A module counts when it has timm's ``Attention`` interface: ``qkv``, ``attn_drop``,
    ``fused_attn`` and ``num_heads``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if the model has no such module (a CNN, or a ViT not built from timm blocks).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}.")
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


class AttentionCapture:
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
            stack.enter_context(unfused_attention(self.model))
            for module in self.modules:
                stack.callback(module.attn_drop.register_forward_pre_hook(self._record).remove)
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.attentions)

    def clear(self) -> None:
        """Forget the recorded attention maps (before another forward pass)."""
        self.attentions = []

    def _record(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.attentions.append(args[0])
