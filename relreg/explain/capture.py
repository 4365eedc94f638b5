"""Capture the attention probabilities of a timm ViT, for one call, without changing the model.

timm's ``Attention`` computes ``softmax(q k^T * scale)`` and passes it through ``attn_drop``
unless ``fused_attn`` is on, in which case the probabilities never exist as a tensor. The
:class:`AttentionCapture` context manager switches ``fused_attn`` off on every attention module,
records the post-softmax, pre-dropout probabilities ``A: (B, heads, N, N)`` with a forward
pre-hook on ``attn_drop`` (the tensor RobustViT and Chefer et al. differentiate), and on exit,
also after an error, removes every hook and restores every flag (the dense engine).

:class:`KernelCapture` reads attention where every implementation meets: at the call of
``F.scaled_dot_product_attention``. A ``TorchFunctionMode`` sees every call of the kernel (also
one imported by name) and records exactly what it receives and returns: ``q`` and ``k`` after
rotary embedding and qk-norm, ``v``, the additive bias or mask (BEiT's relative position bias,
NaFlexViT's padding mask), the scale and the output, whose gradient is ``dy/dO``. Hooks on the
model's blocks say which block made each call. The chunked engine (:mod:`relreg.explain.chunked`)
recomputes the attention from these; :mod:`relreg.explain.engine` judges whether it can.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "AttentionCapture",
    "KernelCall",
    "KernelCapture",
    "BlockInput",
    "rerun_kernel_call",
    "attention_pool",
    "eager_modules",
    "find_attention_modules",
    "explicit_attention",
    "fused_attention",
    "instance_attributes",
    "hierarchical_problem",
    "kernel_blocks",
    "unfused_attention",
]

_REQUIRED = ("qkv", "attn_drop", "fused_attn", "num_heads")


def _is_timm_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in _REQUIRED) and isinstance(
        module.attn_drop, nn.Module
    )


# module classes of hierarchical window models (Swin v1/v2 and their kin), by name so that any
# timm version's and a user's copies are recognised alike
_HIERARCHICAL = (
    "PatchMerging",
    "WindowAttention",
    "SwinTransformerBlock",
    "SwinTransformerV2Block",
)


def hierarchical_problem(model: nn.Module) -> str | None:
    """Why attention explainers cannot read ``model`` when it is a hierarchical window model
    (Swin-style window attention or patch merging), else None."""
    found = sorted({type(m).__name__ for m in model.modules()} & set(_HIERARCHICAL))
    if not found:
        return None
    return (
        f"{type(model).__name__} is a hierarchical window model ({', '.join(found)}): attention "
        "runs inside local windows and patch merging changes the tokens between stages, so there "
        "is no attention matrix over one token sequence for the attention rules (rollout, chefer, "
        "LRP) to propagate. The gradient and perturbation explainers (saliency, "
        "input_x_gradient, smoothgrad, integrated_gradients, occlusion, lime) work on it"
    )


def find_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules of ``model`` in forward (registration) order.

    A module counts when it has timm's ``Attention`` interface: ``qkv``, ``attn_drop``,
    ``fused_attn`` and ``num_heads``. A model that lists its own (``model.attention_modules()``,
    e.g. :class:`relreg.explain.HuggingFaceViT`) is asked instead.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: for a hierarchical window model (Swin; :func:`hierarchical_problem`), or a
            model without such modules (a CNN, or a ViT not built from timm blocks).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}.")
    own = getattr(model, "attention_modules", None)
    if callable(own):
        return list(own())
    hierarchical = hierarchical_problem(model)
    if hierarchical is not None:
        raise ValueError(f"Expected a ViT with one token sequence, but {hierarchical}.")
    found = [m for m in model.modules() if _is_timm_attention(m)]
    if not found:
        raise ValueError(
            f"Expected a timm ViT with attention modules (timm's Attention: attributes "
            f"{', '.join(_REQUIRED)}), but found none in {type(model).__name__}. Attention-based "
            "explainers need such blocks; gradient explainers (saliency, input_x_gradient, "
            "smoothgrad, integrated_gradients) work on any differentiable classifier."
        )
    return found


def kernel_blocks(model: nn.Module) -> list[nn.Module] | None:
    """The residual blocks whose attention-kernel calls the chunked engine reads, in forward
    order: timm's ``model.blocks``, or what a model lists itself (``model.kernel_blocks()``, e.g.
    :class:`relreg.explain.HuggingFaceViT`); None for a model without such a list."""
    own = getattr(model, "kernel_blocks", None)
    if callable(own):
        return list(own())
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) > 0:
        return list(blocks)
    return None


def attention_pool(model: nn.Module) -> nn.Module | None:
    """The attention-pool read-out of ``model`` (``global_pool="map"``: timm's
    ``AttentionPoolLatent``, SigLIP, SigLIP 2, PE), or None."""
    if getattr(model, "global_pool", None) != "map":
        return None
    pool = getattr(model, "attn_pool", None)
    return pool if isinstance(pool, nn.Module) else None


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Switch ``fused_attn`` off on every module of ``model`` that has the flag, for the block:
    timm's attention of every kind (``Attention``, ``EvaAttention``, BEiT's, the attention pool).

    Needed for double backward (``create_graph=True`` through attention): PyTorch's fused
    scaled-dot-product kernels have no second derivative. A model without such modules is left
    alone. Flags are restored on exit, also after an error.

    Yields:
        The modules whose flag was switched (possibly none).
    """
    with _fused_attn_flags(model, False) as modules:
        yield modules


_UNSET = object()


@contextmanager
def instance_attributes(changes: list[tuple[nn.Module, str, object]]) -> Iterator[None]:
    """Every ``(module, name, value)`` of ``changes`` set on the module instance for the block,
    then restored (also after an error): an attribute the instance did not hold itself (a class
    attribute or method, such as ``forward``) is deleted again, so the class's shows through.
    The one home of the explainers' set-and-restore."""
    done: list[tuple[nn.Module, str, object]] = []
    try:
        for module, name, value in changes:
            done.append((module, name, vars(module).get(name, _UNSET)))
            setattr(module, name, value)
        yield
    finally:
        for module, name, old in reversed(done):
            if old is _UNSET:
                delattr(module, name)
            else:
                setattr(module, name, old)


@contextmanager
def _attribute_set(modules: list[nn.Module], name: str, value: object) -> Iterator[list[nn.Module]]:
    """``name`` set to ``value`` on every one of ``modules`` for the block, then restored (also
    after an error); yields the modules."""
    with instance_attributes([(m, name, value) for m in modules]):
        yield modules


def _fused_attn_flags(root: nn.Module, value: bool) -> AbstractContextManager[list[nn.Module]]:
    """Every ``fused_attn`` flag inside ``root`` set to ``value`` for the block, then restored;
    yields the modules that have the flag."""
    modules = [m for m in root.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    return _attribute_set(modules, "fused_attn", value)


def eager_modules(root: nn.Module) -> AbstractContextManager[list[nn.Module]]:
    """Run the submodules of ``root`` compiled in place (``module.compile()``) eagerly for the
    block, then restore their compiled calls (also after an error).

    A compiled call runs a graph, in which the captures' hooks and ``TorchFunctionMode`` do not
    see the modules' own calls; eager, they do, with the same weights and the same function.

    Yields:
        The modules whose compiled call was set aside (possibly none).
    """
    modules = [m for m in root.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    return _attribute_set(modules, "_compiled_call_impl", None)


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
            stack.enter_context(eager_modules(self.model))
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


@dataclass
class KernelCall:
    """One call of ``F.scaled_dot_product_attention``, as the kernel saw it.

    A capture that keeps only the blocks' inputs (``keep="inputs"``) records the blocks' calls
    without their tensors (``q``, ``k``, ``v``, ``mask`` and ``out`` None) and catches ``dy/dO``
    in ``d_out`` with a one-shot gradient hook on the output instead; :func:`rerun_kernel_call`
    recomputes the tensors from the block's input.

    Attributes:
        q: ``(B, heads, Lq, head_dim)``, after rotary embedding and qk-norm (keeps the graph).
        k, v: ``(B, heads, Lk, head_dim)`` (grouped key/value heads expanded to ``heads``).
        mask: the additive bias (float) or the boolean mask (True: attend), broadcastable to
            ``(B, heads, Lq, Lk)``, or None.
        scale: the scale the kernel used (``head_dim ** -0.5`` unless given).
        dropout_p: the kernel's dropout probability.
        is_causal: the kernel's causal flag.
        out: ``(B, heads, Lq, head_dim)``, the kernel's output (its gradient is ``dy/dO``).
        block: index of the block in :func:`kernel_blocks` that made the call, or None.
        pool: whether the call came from the attention-pool read-out (:func:`attention_pool`).
        queries, keys: ``Lq`` and ``Lk``.
        graph: whether ``q`` had a graph (``q.requires_grad``).
        dtype: ``q``'s dtype.
        attention: ``(B, heads, Lq, Lk)`` probabilities, only for the pool's call, computed
            explicitly there (one latent row per query: small) so that its gradient exists.
        d_out: ``dy/dO`` caught by the gradient hook (``keep="inputs"`` only), else None.
    """

    q: Tensor | None
    k: Tensor | None
    v: Tensor | None
    mask: Tensor | None
    scale: float
    dropout_p: float
    is_causal: bool
    out: Tensor | None
    block: int | None
    pool: bool
    queries: int = 0
    keys: int = 0
    graph: bool = False
    dtype: torch.dtype = torch.float32
    attention: Tensor | None = None
    d_out: Tensor | None = None


@dataclass
class BlockInput:
    """The arguments one block was called with in the recorded forward pass (for a rerun).

    Attributes:
        block: the block module.
        args: its positional arguments (the tokens ``(B, N, D)`` first).
        kwargs: its keyword arguments (e.g. EVA's ``rope``, NaFlexViT's ``attn_mask``).
    """

    block: nn.Module
    args: tuple
    kwargs: dict


_SDPA_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in (
            ("query", inspect.Parameter.empty),
            ("key", inspect.Parameter.empty),
            ("value", inspect.Parameter.empty),
            ("attn_mask", None),
            ("dropout_p", 0.0),
            ("is_causal", False),
            ("scale", None),
            ("enable_gqa", False),
        )
    ]
)


def _expand_heads(t: Tensor, heads: int) -> Tensor:
    """Grouped key/value heads ``(B, g, L, d)`` repeated to ``(B, heads, L, d)``."""
    return t if t.shape[-3] == heads else t.repeat_interleave(heads // t.shape[-3], dim=-3)


def explicit_attention(q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """``softmax(q k^T * scale + mask)``, the probabilities the kernel computes internally.

    Args:
        q: ``(..., Lq, d)``; k: ``(..., Lk, d)``.
        mask: additive float bias or boolean mask (True: attend), broadcastable; or None.
        scale: the attention scale.

    Returns:
        ``(..., Lq, Lk)``.
    """
    logits = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        logits = _add_mask(logits, mask)
    return logits.softmax(dim=-1)


def _add_mask(logits: Tensor, mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask


class _KernelMode(TorchFunctionMode):
    """The ``TorchFunctionMode`` behind :class:`KernelCapture` and :func:`rerun_kernel_call`:
    every call of ``F.scaled_dot_product_attention`` goes to ``on_call(kernel, arguments)``."""

    def __init__(self, on_call) -> None:  # noqa: ANN001
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return self.on_call(func, _SDPA_SIGNATURE.bind(*args, **kwargs).arguments)


def _record(arguments: dict, out: Tensor, block: int | None, pool: bool) -> KernelCall:
    """The :class:`KernelCall` of one kernel call with the kernel's ``arguments`` and ``out``."""
    q = arguments["query"]
    heads = q.shape[-3]
    k = _expand_heads(arguments["key"], heads)
    scale = arguments.get("scale")
    return KernelCall(
        q=q,
        k=k,
        v=_expand_heads(arguments["value"], heads),
        mask=arguments.get("attn_mask"),
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        dropout_p=float(arguments.get("dropout_p", 0.0)),
        is_causal=bool(arguments.get("is_causal", False)),
        out=out,
        block=block,
        pool=pool,
        queries=q.shape[-2],
        keys=k.shape[-2],
        graph=q.requires_grad,
        dtype=q.dtype,
    )


KEEP = ("tensors", "inputs")


class KernelCapture(_HookContext):
    """Context manager that records every call of the fused attention kernel, per block.

    Fused attention stays on: every module with a ``fused_attn`` flag inside the model's blocks
    and its attention pool calls the kernel while the context is active (flags restored on
    exit, also after an error). The calls are recorded in :attr:`calls`, in call order. The
    attention pool's call (a cross-attention read-out) is computed explicitly instead, which is
    the same function and gives its probabilities a gradient. The capture only records; whether
    the records can be used is judged by
    :meth:`relreg.explain.engine.EngineChoice.after_forward`.

    ``keep="inputs"`` is the capture for gradient checkpointing: holding every block's ``q``,
    ``k``, ``v`` and ``O`` would keep alive the activations checkpointing frees, so it keeps
    each block's input arguments instead (:attr:`inputs`, tensors checkpointing keeps anyway),
    records the blocks' calls without their tensors and catches ``dy/dO`` with a one-shot
    gradient hook on each output (:attr:`KernelCall.d_out`); :func:`rerun_kernel_call`
    recomputes a block's ``q``, ``k``, ``v`` and bias from its input when they are needed.

    Args:
        model: a ViT (any model whose blocks call ``F.scaled_dot_product_attention``).
        read_blocks: record the blocks' calls and keep their attention fused; False records the
            attention pool's call only (for the dense engine, which reads the blocks itself).
        keep: ``"tensors"`` (default) or ``"inputs"``, see above.

    Attributes:
        calls: the :class:`KernelCall` records of the forward passes run inside the context.
        inputs: per block, its :class:`BlockInput` of the first call (``keep="inputs"``).
        blocks: the model's blocks (:func:`kernel_blocks`; empty when it has none).
        pool: the model's attention pool (:func:`attention_pool`), or None.
        grad_enabled: whether gradients were enabled when the context was entered.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3, depth=2).eval()
        >>> with KernelCapture(model) as cap:
        ...     _ = model(torch.randn(2, 3, 32, 32))
        >>> [(c.block, tuple(c.q.shape)) for c in cap.calls]
        [(0, (2, 3, 17, 64)), (1, (2, 3, 17, 64))]
    """

    def __init__(self, model: nn.Module, read_blocks: bool = True, keep: str = "tensors") -> None:
        if keep not in KEEP:
            raise ValueError(f"Expected keep to be one of {KEEP}, but got {keep!r}.")
        self.model = model
        self.read_blocks = read_blocks
        self.keep = keep
        self.blocks = (kernel_blocks(model) or []) if read_blocks else []
        self.pool = attention_pool(model)
        self.calls: list[KernelCall] = []
        self.inputs: dict[int, BlockInput] = {}
        self._block: int | None = None
        self._in_pool = False
        self.grad_enabled = False
        self._stack: ExitStack | None = None

    def __enter__(self) -> KernelCapture:
        if self._stack is not None:
            raise RuntimeError("KernelCapture is not re-entrant: exit it before entering again.")
        self.calls = []
        self.inputs = {}
        self.grad_enabled = torch.is_grad_enabled()
        with ExitStack() as stack:
            stack.enter_context(eager_modules(self.model))
            if self.read_blocks:
                stack.enter_context(_kernel_context(self.model, self.blocks))
            if self.pool is not None:
                stack.enter_context(_fused_attn_flags(self.pool, True))
            for i, block in enumerate(self.blocks):
                enter = block.register_forward_pre_hook(self._enter_block(i), with_kwargs=True)
                stack.callback(enter.remove)
                stack.callback(block.register_forward_hook(self._leave_block).remove)
            if self.pool is not None:
                stack.callback(self.pool.register_forward_pre_hook(self._enter_pool).remove)
                stack.callback(self.pool.register_forward_hook(self._leave_pool).remove)
            stack.enter_context(_KernelMode(self._call))
            self._stack = stack.pop_all()
        return self

    def _enter_block(self, index: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._block = index
            if self.keep == "inputs" and index not in self.inputs:
                self.inputs[index] = BlockInput(module, args, kwargs)

        return hook

    def _leave_block(self, module: nn.Module, args: tuple, output: object) -> None:
        self._block = None

    def _enter_pool(self, module: nn.Module, args: tuple) -> None:
        self._in_pool = True

    def _leave_pool(self, module: nn.Module, args: tuple, output: object) -> None:
        self._in_pool = False

    def _call(self, kernel, arguments: dict) -> Tensor:  # noqa: ANN001
        if not (self._in_pool or self.read_blocks):
            return kernel(**arguments)
        if self._in_pool:
            record = _record(arguments, arguments["query"], None, True)
            record.attention = explicit_attention(record.q, record.k, record.mask, record.scale)
            record.out = record.attention @ record.v
            self.calls.append(record)
            return record.out
        out = kernel(**arguments)
        record = _record(arguments, out, self._block, False)
        if self.keep == "inputs":
            record = _metadata_only(record)
        self.calls.append(record)
        return out


def _metadata_only(record: KernelCall) -> KernelCall:
    """``record`` without its tensors, catching ``dy/dO`` in ``d_out`` with a one-shot hook."""
    out = record.out
    light = replace(record, q=None, k=None, v=None, mask=None, out=None)
    if out is not None and out.requires_grad:

        def catch(grad: Tensor) -> None:
            light.d_out = grad
            handle.remove()  # later backward passes (the loss's) leave it alone

        handle = out.register_hook(catch)
    return light


@contextmanager
def _kernel_context(model: nn.Module, blocks: list[nn.Module]) -> Iterator[None]:
    """Fused attention on in ``blocks`` (and transformers' "sdpa" implementation, through the
    model's own ``kernel_attention()``), restored on exit."""
    with ExitStack() as stack:
        kernel_attention = getattr(model, "kernel_attention", None)
        if callable(kernel_attention):
            stack.enter_context(kernel_attention())
        for block in blocks:
            stack.enter_context(_fused_attn_flags(block, True))
        yield


def fused_attention(model: nn.Module) -> AbstractContextManager[None]:
    """Every attention of ``model`` calls ``F.scaled_dot_product_attention`` for the block: the
    ``fused_attn`` flags on (timm) and transformers' "sdpa" implementation (through the model's
    own ``kernel_attention()``), restored on exit, also after an error."""
    return _kernel_context(model, [model])


class _Stop(Exception):
    """Raised at the kernel call of a rerun: the rest of the block is not needed."""


def rerun_kernel_call(model: nn.Module, recorded: BlockInput) -> KernelCall:
    """Recompute one block's kernel call from its recorded input, up to the call.

    The block runs again on the arguments of :class:`KernelCapture` (``keep="inputs"``), with
    fused attention on, until it calls ``F.scaled_dot_product_attention``; the rest of the block
    is skipped. The returned ``q`` and ``k`` have a graph back to the block's input and weights
    when gradients are enabled, so a loss on a map computed from them trains the model as the
    recorded call's would. The block must compute the same ``q``, ``k`` and ``v`` again: the
    engine runs it only where no randomness precedes the kernel (attention dropout is refused).

    Args:
        model: the model the block belongs to (for its ``kernel_attention()`` context).
        recorded: the block and the arguments it was called with.

    Returns:
        The call, with its tensors (``out`` None: the kernel is not run).

    Raises:
        RuntimeError: when the block makes no kernel call.
    """
    calls: list[KernelCall] = []

    def stop(kernel, arguments: dict) -> Tensor:  # noqa: ANN001
        calls.append(_record(arguments, None, None, False))
        raise _Stop

    with eager_modules(recorded.block), _kernel_context(model, [recorded.block]), _KernelMode(stop):
        try:
            recorded.block(*recorded.args, **recorded.kwargs)
        except _Stop:
            pass
    if not calls:
        raise RuntimeError(
            f"Expected {type(recorded.block).__name__} to call F.scaled_dot_product_attention "
            "again when rerun, but it made no call."
        )
    return calls[0]
