"""The AttnLRP / CP-LRP rules as a context manager on a model's own modules.

Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin & Samek, "AttnLRP: Attention-Aware
Layer-Wise Relevance Propagation for Transformers", ICML 2024; CP-LRP: Ali, Schnake, Eberle,
Montavon, Mueller & Wolf, "XAI for Transformers: Better Explanations through Conservative
Propagation", ICML 2022; the Gamma rule: Montavon, Binder, Lapuschkin, Samek & Mueller,
"Layer-Wise Relevance Propagation: An Overview", 2019.

Every rule is written in gradient x input form: inside :class:`AttnLRPRules` the model's forward
values are unchanged (up to rounding), but its backward pass follows the LRP rules, so that
``x * d y / d x`` is the LRP relevance of ``x``. Each rule is a ``detach`` trick, not a custom
backward, so the modified gradient is itself differentiable (``create_graph=True``) and a loss on
the map trains the model:

- **normalisation** (``LayerNorm``, ``RMSNorm`` and timm's twins): identity rule, the standard
  deviation (or RMS) held constant; LayerNorm's mean keeps its gradient, as in LXT's
  ``layer_norm_forward`` (``lxt/efficient/patches.py``);
- **element-wise non-linearities** (GELU, SiLU, QuickGELU, ...): identity rule, the ratio
  ``f(x) / (x + 1e-10)`` held constant (LXT's ``identity_rule_implicit``,
  ``lxt/efficient/rules.py``);
- **gated MLPs** (timm's ``SwiGLU`` and ``GluMlp``): the uniform rule on the product, half of the
  gradient to each factor (LXT's ``divide_gradient`` after the product);
- **attention**, at the call of ``F.scaled_dot_product_attention`` (so every timm family, its
  rotary embeddings and attention biases, and transformers' "sdpa" models):

  - ``attention="cp"``: CP-LRP, the attention probabilities held constant, relevance flows
    through ``v`` only (LXT's ``cp_multi_head_attention_forward``,
    ``lxt/efficient/models/vit_torch.py``);
  - ``attention="attnlrp"``: AttnLRP, the uniform rule on ``q k^T`` and on ``A v`` (the
    gradients of ``q`` and ``k`` divided by 4, of ``v`` by 2, as LXT's ``patch_attention``),
    and the plain gradient through the softmax, which *is* AttnLRP's softmax rule in this form;

- **Gamma rule** (``gamma`` a float): on every ``nn.Linear`` and ``nn.Conv2d`` outside the
  attention modules (the patch embedding, the MLPs, the head), as zennit's ``Gamma`` with its
  ``1e-6`` stabiliser, which LXT's ViT example applies to exactly these layers (the projections
  inside ``nn.MultiheadAttention`` are never called as modules there).

Differences from LXT, on purpose: the rules change the explained model's module *instances*
for the block and are undone on exit, also after an error (LXT replaces the forward methods of
torch's classes for the whole process); CP-LRP detaches ``q`` and ``k`` where the kernel is
called (LXT detaches the attention's input, before the in-projection), which gives the same map;
when the graph is kept (``dense=True``) the attention probabilities stay a function of every
parameter before them, so a loss on the map also trains ``W_q`` and ``W_k`` and the blocks
below, while in LXT's form they depend on ``W_q``, ``W_k`` of the same block only; low-precision
inputs are normalised in float32.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relreg.explain.capture import (
    _add_mask,
    _expand_heads,
    _HookContext,
    _KernelMode,
    eager_modules,
    explicit_attention,
    fused_attention,
    instance_attributes,
)

__all__ = ["ATTENTION_RULES", "AttnLRPRules", "divide_gradient", "uniform_rule"]

ATTENTION_RULES = ("cp", "attnlrp")

_IDENTITY_EPS = 1e-10  # LXT's identity rule: f(x) / (x + 1e-10), not sign-aware
_GAMMA_STABILIZER = 1e-6  # zennit's Gamma(stabilizer=1e-6)


# ------------------------------------------------------------------------------ the rules


def divide_gradient(t: Tensor, factor: float) -> Tensor:
    """``t`` in the forward pass, ``grad / factor`` in the backward pass (LXT's uniform rule);
    differentiable again. Any shape."""
    frozen = t.detach()
    return frozen + (t - frozen) / factor


class _ConstantRatio(torch.autograd.Function):
    """``y`` forward, ``grad * ratio`` backward, ``ratio`` a constant: the identity rule's
    local gradient, as LXT's ``identity_rule_implicit_fn``. The backward is written with
    differentiable operations, so a second backward pass (``differentiable=True``) goes through
    it, linear in ``grad``, as through ``y + ratio * (x - x.detach())``, at a third of the
    element-wise work in the forward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, ratio: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(ratio)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None, None


def _identity_rule(original: Callable[[Tensor], Tensor]) -> Callable:
    """An element-wise ``f``: the value ``f(x)``, the local gradient ``f(x) / (x + 1e-10)`` held
    constant (0 where ``x + 1e-10`` is exactly 0)."""

    def forward(self: nn.Module, x: Tensor) -> Tensor:
        with torch.no_grad():
            y = original(x)
            # a ratio is non-finite only where x + 1e-10 is exactly 0 (elsewhere it is at
            # least the float spacing near 1e-10): nan_to_num_ zeroes those in place
            ratio = torch.div(y, x + _IDENTITY_EPS).nan_to_num_(0.0, 0.0, 0.0)
        return _ConstantRatio.apply(x, y, ratio)

    return forward


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _layer_norm_rule(self: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm with its standard deviation held constant (the mean keeps its gradient)."""
    dims = tuple(range(-len(self.normalized_shape), 0))
    h = x.to(_work_dtype(x))
    centred = h - h.mean(dims, keepdim=True)
    std = (centred.pow(2).mean(dims, keepdim=True) + self.eps).sqrt()
    y = centred / std.detach()
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y.to(x.dtype)


def _rms_norm_rule(self: nn.Module, x: Tensor) -> Tensor:
    """RMSNorm with its root mean square held constant."""
    dims = tuple(range(-len(self.normalized_shape), 0))
    h = x.to(_work_dtype(x))
    eps = self.eps if self.eps is not None else torch.finfo(h.dtype).eps
    rms = (h.pow(2).mean(dims, keepdim=True) + eps).sqrt()
    y = h / rms.detach()
    if getattr(self, "weight", None) is not None:
        y = y * self.weight
    if getattr(self, "bias", None) is not None:
        y = y + self.bias
    return y.to(x.dtype)


def uniform_rule(product: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    """A bilinear ``product(a, b)`` under the uniform rule: the value ``product(a, b)``, half of
    the gradient to each factor.

    Written as ``product(a, b)`` (held constant) plus ``(product(a - a', b) + product(a, b - b'))
    / 2`` with ``'`` a detached copy: both added terms are zero, their gradients are half of the
    product's, and the factors' values (not gradient-scaled copies of them) enter the backward
    pass, so its derivative (``create_graph``) is the derivative of this rule as a function.
    """
    with torch.no_grad():
        value = product(a, b)
    return value + (product(a - a.detach(), b) + product(a, b - b.detach())) / 2


def _uniform_product(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` with half of the gradient to each factor (the uniform rule)."""
    return uniform_rule(torch.mul, a, b)


def _swiglu_rule(self: nn.Module, x: Tensor) -> Tensor:
    """timm's ``SwiGLU.forward`` with the uniform rule on the gate product."""
    gate = self.act(self.fc1_g(x))
    x = _uniform_product(gate, self.fc1_x(x))
    return self.drop2(self.fc2(self.norm(self.drop1(x))))


def _glu_mlp_rule(self: nn.Module, x: Tensor) -> Tensor:
    """timm's ``GluMlp.forward`` with the uniform rule on the gate product."""
    x1, x2 = self.fc1(x).chunk(2, dim=self.chunk_dim)
    x = _uniform_product(x1, self.act(x2)) if self.gate_last else _uniform_product(self.act(x1), x2)
    return self.drop2(self.fc2(self.norm(self.drop1(x))))


def _stabilize(t: Tensor) -> Tensor:
    """zennit's ``stabilize``: ``t + 1e-6 * sign(t)``, with sign(0) = +1."""
    return t + ((t == 0).to(t.dtype) + t.sign()) * _GAMMA_STABILIZER


def _gamma_rule(gamma: float, affine: Callable[..., Tensor]) -> Callable:
    """The Gamma rule on ``z = affine(x, weight, bias)`` (a linear or a convolution)."""

    def forward(self: nn.Module, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        z = affine(self, x, w, b)
        w_pos, w_neg = w + gamma * w.clamp(min=0), w + gamma * w.clamp(max=0)
        b_pos = None if b is None else b + gamma * b.clamp(min=0)
        b_neg = None if b is None else b + gamma * b.clamp(max=0)
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        # zennit's o0 + o1 (the output's positive part) and o2 + o3 (its negative part)
        o_pos = affine(self, x_pos, w_pos, b_pos) + affine(self, x_neg, w_neg, None)
        o_neg = affine(self, x_pos, w_neg, b_neg) + affine(self, x_neg, w_pos, None)
        frozen = z.detach()
        zero = torch.zeros_like(frozen)
        modified = torch.where(frozen > 0, o_pos * (frozen / _stabilize(o_pos)).detach(), zero)
        modified = modified + torch.where(
            frozen < 0, o_neg * (frozen / _stabilize(o_neg)).detach(), zero
        )
        return frozen + (modified - modified.detach())

    return forward


def _linear(self: nn.Linear, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x, w, b)


def _conv(self: nn.Conv2d, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return self._conv_forward(x, w, b)


def _scores(q: Tensor, k: Tensor) -> Tensor:
    return q @ k.transpose(-2, -1)


class _ConstantAttention(torch.autograd.Function):
    """``A @ v`` whose backward sends nothing to ``A`` and ``A^T g`` to ``v``, written with
    differentiable operations on the live ``A``: CP-LRP with the graph kept."""

    @staticmethod
    def forward(ctx, a: Tensor, v: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(a)
        return a @ v

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # noqa: ANN001
        (a,) = ctx.saved_tensors
        return None, a.transpose(-2, -1) @ grad


# ----------------------------------------------------------------------- which modules


def _activation_classes() -> tuple[type, ...]:
    from timm.layers import activations as timm_act

    classes: list[type] = [
        nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
        nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.Softplus, nn.ReLU6,
    ]  # fmt: skip
    classes += [
        timm_act.GELU, timm_act.GELUTanh, timm_act.QuickGELU, timm_act.Swish, timm_act.Mish,
        timm_act.HardSwish, timm_act.HardMish, timm_act.Sigmoid, timm_act.Tanh,
        timm_act.HardSigmoid,
    ]  # fmt: skip
    try:  # transformers' own activation modules (GELUActivation, QuickGELUActivation, ...)
        from transformers.activations import ACT2CLS
    except ImportError:
        pass
    else:
        for entry in ACT2CLS.values():
            cls = entry[0] if isinstance(entry, tuple) else entry
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                classes.append(cls)
    return tuple(dict.fromkeys(classes))


def _rms_classes() -> tuple[type, ...]:
    from timm.layers import RmsNorm, RmsNormFp32, SimpleNorm, SimpleNormFp32

    return (nn.RMSNorm, RmsNorm, RmsNormFp32, SimpleNorm, SimpleNormFp32)


def _gated_rules() -> dict[type, Callable]:
    from timm.layers import GluMlp, SwiGLU

    return {SwiGLU: _swiglu_rule, GluMlp: _glu_mlp_rule}


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that call the attention kernel themselves (a ``fused_attn`` flag)."""
    return [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


def rule_forwards(model: nn.Module, gamma: float | None) -> list[tuple[nn.Module, str, object]]:
    """The instance ``forward`` of every module of ``model`` an LRP rule changes, as
    ``(module, "forward", bound method)`` changes for
    :func:`relreg.explain.capture.instance_attributes`."""
    activations, rms, gated = _activation_classes(), _rms_classes(), _gated_rules()
    inside_attention = {
        id(sub) for m in _attention_modules(model) for sub in m.modules() if sub is not m
    }
    changes: list[tuple[nn.Module, str, object]] = []
    for module in model.modules():
        rule: Callable | None = None
        if isinstance(module, nn.LayerNorm):
            rule = _layer_norm_rule
        elif isinstance(module, rms):
            rule = _rms_norm_rule
        elif isinstance(module, activations):
            rule = _identity_rule(module.forward)
        elif type(module) in gated:
            rule = gated[type(module)]
        elif gamma is not None and id(module) not in inside_attention:
            if isinstance(module, nn.Linear):
                rule = _gamma_rule(gamma, _linear)
            elif isinstance(module, nn.Conv2d):
                rule = _gamma_rule(gamma, _conv)
        if rule is not None:
            changes.append((module, "forward", types.MethodType(rule, module)))
    return changes


# ----------------------------------------------------------------------------- the context


def check_rules(attention: object, gamma: object) -> None:
    """``attention`` one of :data:`ATTENTION_RULES`, ``gamma`` None or a float >= 0."""
    if attention not in ATTENTION_RULES:
        raise ValueError(f"Expected attention one of {ATTENTION_RULES}, but got {attention!r}.")
    if gamma is not None and (
        isinstance(gamma, bool) or not isinstance(gamma, int | float) or not gamma >= 0
    ):
        raise ValueError(f"Expected gamma None or a float >= 0, but got {gamma!r}.")


class AttnLRPRules(_HookContext):
    """Context manager: inside it, ``model``'s backward pass follows the AttnLRP rules.

    On entry the rule forwards are set on the model's own module instances (see the module
    docstring), every attention of the model is routed through ``F.scaled_dot_product_attention``
    (``fused_attn`` on, transformers' "sdpa"), compiled submodules run eagerly, and a
    ``TorchFunctionMode`` applies the attention rule at every kernel call. On exit, also after an
    error, everything is restored.

    Args:
        model: a ViT (any model whose attention calls ``F.scaled_dot_product_attention``).
        attention: ``"cp"`` (CP-LRP, default) or ``"attnlrp"``.
        gamma: the Gamma rule's gamma on the linear layers outside attention; None: off.
        dense: compute the attention explicitly (``softmax(q k^T * scale + bias) @ v``), which
            has a second derivative; the fused kernel (``dense=False``) has none.

    Attributes:
        calls: the number of kernel calls seen so far.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3).eval()
        >>> x = torch.rand(1, 3, 32, 32, requires_grad=True)
        >>> with AttnLRPRules(model) as rules:
        ...     model(x)[0, 0].backward()
        >>> relevance = (x * x.grad).sum(1)  # (1, 32, 32)
        >>> rules.calls
        12
    """

    def __init__(
        self,
        model: nn.Module,
        attention: str = "cp",
        gamma: float | None = None,
        dense: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected model to be a torch.nn.Module, but got {type(model).__name__}."
            )
        check_rules(attention, gamma)
        self.model = model
        self.attention = attention
        self.gamma = None if gamma is None else float(gamma)
        self.dense = bool(dense)
        self.calls = 0
        self._depth = 0

    def __enter__(self) -> AttnLRPRules:
        stack = ExitStack()
        try:
            stack.enter_context(eager_modules(self.model))
            stack.enter_context(fused_attention(self.model))
            stack.enter_context(instance_attributes(rule_forwards(self.model, self.gamma)))
            stack.enter_context(_KernelMode(self._call))
            self._depth = 0
            stack.callback(self.model.register_forward_pre_hook(self._enter).remove)
            stack.callback(self.model.register_forward_hook(self._leave, always_call=True).remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1

    def _leave(self, module: nn.Module, args: tuple, output: object) -> None:
        self._depth -= 1

    def _call(self, kernel: Callable[..., Tensor], arguments: dict) -> Tensor:
        """One kernel call under the attention rule (a call from another model passes)."""
        if self._depth == 0:
            return kernel(**arguments)
        self.calls += 1
        q, k, v = arguments["query"], arguments["key"], arguments["value"]
        mask = arguments.get("attn_mask")
        scale = arguments.get("scale")
        dropout_p = float(arguments.get("dropout_p", 0.0))
        if arguments.get("is_causal", False):
            raise ValueError("Expected is_causal=False (ViT self-attention), but got True.")
        if not self.dense:  # first order only: the fused kernel on gradient-scaled inputs
            if self.attention == "cp":
                return kernel(**{**arguments, "query": q.detach(), "key": k.detach()})
            scaled = divide_gradient(q, 4.0), divide_gradient(k, 4.0), divide_gradient(v, 2.0)
            return kernel(**{**arguments, "query": scaled[0], "key": scaled[1], "value": scaled[2]})
        heads = q.shape[-3]
        k, v = _expand_heads(k, heads), _expand_heads(v, heads)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if self.attention == "cp":
            probs = explicit_attention(q, k, mask, scale)
        else:
            logits = uniform_rule(_scores, q, k) * scale
            probs = (logits if mask is None else _add_mask(logits, mask)).softmax(dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p, training=True)
        probs = probs.to(v.dtype)
        if self.attention == "cp":
            return _ConstantAttention.apply(probs, v)
        return uniform_rule(torch.matmul, probs, v)
