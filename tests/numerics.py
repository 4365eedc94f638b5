"""Floating-point tolerances derived from the computation, not from what one machine printed.

Why a test's float32 result differs from the exact one: every operation rounds. An elementwise
operation's result carries a relative error of at most the unit roundoff ``u`` (``2**-24`` for
float32, half of ``torch.finfo(torch.float32).eps``). A sum of ``n`` terms (matrix products,
convolutions, reductions) carries an error of at most ``gamma_n * sum(|terms|)`` with
``gamma_n = n u / (1 - n u)`` in the worst case, and of about ``sqrt(n) u sum(|terms|)`` in practice
(rounding errors of random sign add like a random walk; Higham & Mary, "A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019). Which of these bounds is
approached depends on the summation order, i.e. on the kernel: ATen's vectorised kernels
(``ATEN_CPU_CAPABILITY=default|avx2|avx512``), MKL and oneDNN block and reorder sums differently,
and fused multiply-adds skip roundings. A tolerance read off one machine's output therefore fails
on another; a tolerance proportional to ``u * sqrt(n) * sum(|terms|)``, propagated through what
follows, holds on all of them. The propagation matters: a relevance rule that divides by
``a + b`` turns an absolute error ``u (|a| + |b|)`` into a relative one ``u (|a| + |b|) / |a + b|``,
the condition number of the sum, which is large exactly where ``a + b`` cancels.

The helpers:

- :func:`sum_bound` for a single sum (or mean) computed in float32: ``k * u * n * sum(|terms|)``,
  the worst-case bound ``gamma_n`` (with ``k`` for the few extra roundings around it), and
  :func:`probable_sum_bound`, ``lam * u * sqrt(n) * sum(|terms|)``, for sums of hundreds of terms
  where the worst case would hide a wrong result.
- :class:`MonteCarloRounding` for deep computations (a ViT's forward pass and a relevance
  propagation through it), where the conditioning of every intermediate matters and no closed form
  is practical: Monte-Carlo arithmetic (Parker, Pierce & Eggert, "Monte Carlo arithmetic", Comput.
  Sci. Eng. 2000). The computation runs in float64, and every arithmetic operation's float64
  result is perturbed by a random error of float32's size: ``u * |result| * r`` for elementwise
  operations, ``u * sqrt(n) * (the same operation on |operands|) * r`` for sums of ``n`` terms,
  ``r`` uniform in [-1, 1]. The spread of the perturbed results is how much float32 rounding,
  propagated through the actual tensors' conditioning, moves the output; :func:`rounding_bound`
  takes the largest deviation over a few trials times a safety factor.

:func:`twin_bound` doubles a :func:`rounding_bound` for two float32 evaluations of one exact
quantity (batched and looped, chunked and whole), :func:`fused_unfused_bound` adds the two
attention paths' bounds, :func:`in_float64` makes the float64 copy of a float32 model that the
bounds run, and :func:`assert_within` compares against a bound (computing it only when the two
sides differ).

A bound from these helpers scales with the data (a bug that moves an output by more than a few
rounding errors of its own terms still fails) and with nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

U32 = 2.0**-24  # float32's unit roundoff: round-to-nearest's largest relative error
U64 = 2.0**-53  # float64's

# sums of many terms: the error scales with sqrt(n) * (the same sum of |terms|)
_SUMS = {
    "mm": lambda a: a[0].shape[-1],
    "bmm": lambda a: a[0].shape[-1],
    "addmm": lambda a: a[1].shape[-1] + 1,
    "baddbmm": lambda a: a[1].shape[-1] + 1,
    "mv": lambda a: a[0].shape[-1],
    "addmv": lambda a: a[1].shape[-1] + 1,
    "dot": lambda a: a[0].numel(),
    "convolution": lambda a: a[1][0].numel() + 1,
    "sum": None,  # n = input numel / output numel
    "mean": None,
    "upsample_bilinear2d": lambda a: 4,  # each output a weighted sum of 4 inputs
    "upsample_bilinear2d_backward": lambda a: 4,
    "avg_pool2d": lambda a: math.prod(_pair(a[1])),
    "avg_pool2d_backward": lambda a: math.prod(_pair(a[2])),
    "col2im": lambda a: math.prod(_pair(a[2])),  # overlapping patches summed
    "scatter_add": lambda a: max(1, a[3].numel() // max(1, a[0].numel())) + 1,
}
# backward sums whose every output is linear in each operand: |operands| give the sizes
_LINEAR_BACKWARD = {
    # grad_input sums over output channels and kernel taps, grad_weight over batch and positions
    "convolution_backward": lambda a: (
        a[0].shape[1] * a[2][0].numel(),
        a[0].numel() // max(1, a[0].shape[1]),
        a[0].numel() // max(1, a[0].shape[1]),
    ),
}
# normalisations: an internal sum over the normalised dimension(s), then elementwise work
_NORMS = {"_softmax", "_log_softmax", "native_layer_norm", "linalg_vector_norm", "logsumexp"}
# elementwise arithmetic: each result rounded once
_ELEMENTWISE = set(
    "add sub rsub mul div exp log sqrt rsqrt pow erf tanh sigmoid reciprocal gelu silu addcmul"
    " addcdiv lerp expm1 log1p gelu_backward tanh_backward sigmoid_backward".split()
)


def _pair(v: object) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v), int(v))


def _is_float(x: object) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def _abs(x: object) -> object:
    # float tensors and scalars (alpha, beta) by magnitude; ints (dims, sizes) as they are
    return x.abs() if _is_float(x) else (abs(x) if isinstance(x, float) else x)


# what CPU and CUDA autocast run in the lower precision (torch.amp's lists: the matrix products,
# convolutions and fused attention), forward and backward
_AUTOCAST_LOW = {
    "mm", "bmm", "addmm", "baddbmm", "mv", "addmv", "dot", "convolution", "convolution_backward",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
}  # fmt: skip


class MonteCarloRounding(TorchDispatchMode):
    """Inside this mode, every float64 arithmetic result gets a random error of float32's size.

    Args:
        seed: the random errors' seed (one trial per seed).
        u: the unit roundoff emulated (default float32's).
        low: the unit roundoff of the operations autocast runs in a lower precision (matrix
            products, convolutions, fused attention; ``2**-8`` for bfloat16), or None: ``u``
            everywhere. It applies to every such operation, also to those a real run keeps in
            float32 by switching autocast off (a dispatch mode cannot see autocast's state):
            conservative there. Their outputs, and the elementwise work done on them before the next
            product (an activation, rotary embedding), round at ``low``: the emulated error of a
            product, ``low * sqrt(n) * (|a| @ |b|)``, is ``sqrt(n)`` times what rounding its
            ``n``-term inputs does on average, and covers those roundings.

    Operations that are exact in any precision (views, copies, indexing, comparisons, ``where``,
    ``clamp``, ``abs``, ``neg``, concatenation) are left alone; inputs and parameters are taken as
    they are (a float32 model cast to float64 holds float32 values exactly).
    """

    def __init__(self, seed: int, u: float = U32, low: float | None = None) -> None:
        super().__init__()
        self.u = u
        self.low = u if low is None else low
        self.generator = torch.Generator().manual_seed(seed)

    def _noise(self, like: Tensor) -> Tensor:
        r = torch.rand(like.shape, generator=self.generator, dtype=torch.float64)
        return (2 * r - 1).to(like.device)

    def _layer_norm_backward(self, out, g, x, shape, mean, rstd, weight, bias):
        """LayerNorm's gradients, sums that cancel: ``rstd (gw - mean(gw) - xh mean(gw xh))`` for
        the input (``gw = g * weight``, ``xh`` the normalised input), sums over the rows of
        ``g xh`` and ``g`` for the weight and bias; each sized by the same sums of ``|terms|``."""
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        n_in = math.prod(shape)
        n_rows = max(1, x.numel() // math.prod(shape))
        xh = (x - mean) * rstd
        gw = (g * weight if weight is not None else g).abs()
        sizes = (
            rstd * (gw + gw.mean(dims, keepdim=True) + xh.abs() * (gw * xh).abs().mean(dims, True)),
            (g * xh).abs().flatten(0, -len(shape) - 1).sum(0) if out[1] is not None else None,
            g.abs().flatten(0, -len(shape) - 1).sum(0) if out[2] is not None else None,
        )
        return tuple(
            o + self.u * math.sqrt(n) * z * self._noise(o) if o is not None else o
            for o, z, n in zip(out, sizes, (n_in, n_rows, n_rows), strict=True)
        )

    def _attention(self, q, k, v, scale):
        """``A = softmax(q k^T scale)`` and the magnitudes ``|q| |k|^T scale`` of its logits."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        s = q @ k.transpose(-2, -1) * scale
        return s.softmax(-1), q.abs() @ k.abs().transpose(-2, -1) * scale

    def _sdpa(self, out, q, k, v, scale=None, u=U32):
        """Fused attention ``A v``: its sums over the keys, sized ``A |v|``, and the logits' sums
        over the head dimension, whose errors move the output by ``A (|q| |k|^T) (|v| + |o|)``."""
        a, s_abs = self._attention(q, k, v, scale)
        o = out[0]
        n = k.shape[-2] + q.shape[-1]
        size = a @ v.abs() + (a * s_abs) @ v.abs() + (a * s_abs).sum(-1, keepdim=True) * o.abs()
        return (o + u * math.sqrt(n) * size * self._noise(o), *out[1:])

    def _sdpa_backward(self, out, g, q, k, v, o, scale=None, u=U32):
        """Fused attention's gradients: ``dv = A^T g``, ``dS = A (g v^T - rowsum(g o))``,
        ``dq = dS k scale``, ``dk = dS^T q scale``, each sized by the same sums of |terms|."""
        a, _ = self._attention(q, k, v, scale)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        ds = a * (g.abs() @ v.abs().transpose(-2, -1) + (g * o).abs().sum(-1, keepdim=True))
        sizes = (ds @ k.abs() * scale, ds.transpose(-2, -1) @ q.abs() * scale)
        sizes = (*sizes, a.transpose(-2, -1) @ g.abs())
        n = k.shape[-2] + q.shape[-1]
        return tuple(
            d + u * math.sqrt(n) * z * self._noise(d) if d is not None else d
            for d, z in zip(out[:3], sizes, strict=True)
        ) + tuple(out[3:])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        inplace = name.endswith("_") and not name.startswith("_")
        base = name[:-1] if inplace else name
        first = next((o for o in out if o is not None), None) if isinstance(out, tuple) else out
        if not (_is_float(first) and first.dtype == torch.float64):
            return out
        u = self.low if base in _AUTOCAST_LOW else self.u
        if base in _SUMS:
            if inplace:
                return out  # no in-place sums in the code under test
            count = _SUMS[base]
            n = count(args) if count else max(1, args[0].numel() // max(1, out.numel()))
            size = func(*[_abs(a) for a in args], **kwargs).abs() * math.sqrt(n)
            return out + u * size * self._noise(out)
        if base in _LINEAR_BACKWARD:
            sizes = func(*[_abs(a) for a in args], **kwargs)
            counts = _LINEAR_BACKWARD[base](args)
            return tuple(
                o + u * math.sqrt(n) * z.abs() * self._noise(o) if _is_float(o) else o
                for o, z, n in zip(out, sizes, counts, strict=True)
            )
        if base == "_scaled_dot_product_flash_attention_for_cpu":
            return self._sdpa(out, *args[:3], scale=kwargs.get("scale"), u=u)
        if base == "_scaled_dot_product_flash_attention_for_cpu_backward":
            return self._sdpa_backward(out, *args[:5], scale=kwargs.get("scale"), u=u)
        if base == "native_layer_norm_backward":
            return self._layer_norm_backward(out, *args[:7])
        if base == "_softmax_backward_data":  # o * (g - sum(o * g)) over the softmax's dim
            g, o, dim = args[:3]
            size = o.abs() * (g.abs() + (o * g).abs().sum(dim, keepdim=True))
            return out + self.u * math.sqrt(o.shape[dim]) * size * self._noise(out)
        if base in _NORMS:
            n = max(1, args[0].shape[-1] if args[0].dim() else 1)
            outs = out if isinstance(out, tuple) else (out,)
            noisy = tuple(
                o + self.u * math.sqrt(n) * o.abs() * self._noise(o) if _is_float(o) else o
                for o in outs
            )
            return noisy if isinstance(out, tuple) else noisy[0]
        if base in _ELEMENTWISE and not isinstance(out, tuple):
            if inplace:
                return out.add_(self.u * out.abs() * self._noise(out))
            return out + self.u * out.abs() * self._noise(out)
        return out


def rounding_bound(
    fn: Callable[[], Tensor | tuple[Tensor, ...]],
    trials: int = 8,
    k: float = 4.0,
    u: float = U32,
    low: float | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """Elementwise bound on the float32 rounding error of ``fn()`` (a float64 computation).

    ``fn`` may return a tuple of tensors (maps and gradients): a tuple of bounds comes back, one
    per tensor, each with its own floor.

    ``fn`` is run once exactly and ``trials`` times under :class:`MonteCarloRounding`; the bound is
    ``k`` times the largest deviation from the exact result, per element, plus ``k * u`` times the
    output's largest magnitude (the rounding of the result itself, and a floor where the trials
    happen to miss an element's sensitivity). The emulated errors are already of the size of the
    probabilistic bound (``sqrt(n) u sum(|terms|)`` per sum, where float32 kernels, blocking their
    sums and fusing multiply-adds, do better); ``k = 4`` covers that a few trials sample the
    spread of the result, not its tail.

    For a ``u`` below float32's (``U64``: the bound of a float64 computation), the trials emulate
    float32's errors and their deviation is scaled by ``u / U32``: to first order a result's
    rounding error is linear in ``u``, and errors of float64's own size would be lost in the
    rounding of the float64 arithmetic that emulates them.

    ``low`` bounds a run under autocast (:class:`MonteCarloRounding`'s ``low``: ``2**-8`` for
    bfloat16's products, ``u`` elsewhere).
    """
    emulated = max(u, U32)
    first = fn()
    single = isinstance(first, Tensor)
    exact = [t.detach() for t in ((first,) if single else first)]
    dev = [torch.zeros_like(t) for t in exact]
    for seed in range(trials):
        with MonteCarloRounding(seed, emulated, low):
            out = fn()
        for i, t in enumerate((out,) if single else out):
            dev[i] = torch.maximum(dev[i], (t.detach() - exact[i]).abs())
    bounds = tuple(
        k * (u / emulated) * d + k * u * e.abs().max() for d, e in zip(dev, exact, strict=True)
    )
    return bounds[0] if single else bounds


def twin_bound(fn: Callable[[], Tensor | tuple[Tensor, ...]], **kwargs):
    """Bound on the difference of two float32 evaluations of the one exact quantity ``fn()``.

    Batched and looped, chunked and whole, fused and unfused: the two differ only in how their
    sums are blocked, each lies within :func:`rounding_bound` of the exact result, so their
    difference lies within twice that (the triangle inequality).
    """
    bound = rounding_bound(fn, **kwargs)
    return 2 * bound if isinstance(bound, Tensor) else tuple(2 * b for b in bound)


def fused_unfused_bound(model: torch.nn.Module, x: Tensor) -> Tensor:
    """Bound on the difference of two float32 forward passes of ``model`` on ``x``, one through
    timm's fused attention kernel and one unfused (or a functional re-implementation of it): the
    same sums in two orders, within the sum of both paths' :func:`rounding_bound`."""
    unfused, x64 = in_float64(model, x, fused=False)
    fused = in_float64(model, fused=True)[0]
    with torch.no_grad():
        return rounding_bound(lambda: unfused(x64)) + rounding_bound(lambda: fused(x64))


def in_float64(model: torch.nn.Module, *tensors: Tensor, fused: bool | None = None):
    """A float64 copy of a float32 model (holding its weights exactly) and of its inputs.

    Attention runs as in ``model`` (timm's ``fused_attn``), or fused / unfused as ``fused`` says.
    Unfused, :class:`MonteCarloRounding` perturbs its sums (``q k^T``, the softmax, ``A v``) one
    by one; the fused CPU kernel (which the chunked engine needs) it sizes as a whole.
    """
    import copy

    twin = copy.deepcopy(model).double()
    if fused is not None:
        for m in twin.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = fused
    return (twin, *(t.double() for t in tensors))


def sum_bound(terms: Tensor, dim=None, k: float = 4.0, u: float = U32) -> Tensor:
    """Worst-case bound on the float32 error of ``terms.sum(dim)``: ``k * n * u * sum(|terms|)``.

    ``n`` is the number of nonzero terms summed (the error of recursive summation is at most
    ``gamma_n sum(|terms|)``, ``gamma_n ~ n u``; blocked and pairwise summation only do better;
    adding a zero is exact), the most over the sums taken; ``k`` covers the few roundings before
    and after the sum (forming the terms, a division). Divide by the number of terms for a mean.
    """
    a = terms.detach().double().abs()
    total = a.sum() if dim is None else a.sum(dim)
    nonzero = (a != 0).sum() if dim is None else (a != 0).sum(dim)
    return k * int(nonzero.max()) * u * total


def probable_sum_bound(terms: Tensor, dim=None, lam: float = 6.0, u: float = U32) -> Tensor:
    """Probable bound on the float32 error of ``terms.sum(dim)``: ``lam sqrt(n) u sum(|terms|)``,
    plus ``2 u sum(|terms|)`` for the roundings forming the terms and after the sum.

    Rounding errors of random sign add like a random walk: with independent, mean-zero roundings
    the error of a sum of ``n`` (nonzero) terms exceeds about ``lam sqrt(n) u sum(|terms|)`` with
    probability at most ``2 n exp(-lam**2 / 2)`` (Higham & Mary 2019; ``lam = 6``, ``n = 1000``:
    3e-5 per sum). :func:`sum_bound`'s worst case ``n u`` is ``sqrt(n)`` times larger, too loose to
    tell a wrong result from rounding in a sum of a few hundred terms. For sums of data (maps,
    probabilities), not of a repeated constant, whose roundings would all go one way.
    """
    a = terms.detach().double().abs()
    total = a.sum() if dim is None else a.sum(dim)
    nonzero = (a != 0).sum() if dim is None else (a != 0).sum(dim)
    return (lam * math.sqrt(int(nonzero.max())) + 2) * u * total


def assert_within(
    actual: Tensor,
    expected: Tensor,
    bound: Tensor | float | Callable[[], Tensor],
    msg: str = "",
) -> None:
    """``|actual - expected| <= bound`` elementwise, with the worst element in the message.

    ``bound`` may be a function computing it (a :func:`rounding_bound`, some seconds): it is called
    only when ``actual`` and ``expected`` differ, since equal results are within any bound.
    """
    assert actual.shape == expected.shape, f"{msg}: shapes {actual.shape} != {expected.shape}"
    diff = (actual.double() - expected.double()).abs()
    if callable(bound):
        if not bool(diff.any()):
            return
        bound = bound()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(diff)
    ratio = diff / bound.clamp(min=torch.finfo(torch.float64).tiny)
    worst = int(ratio.flatten().argmax())
    assert bool((diff <= bound).all()), (
        f"{msg + ': ' if msg else ''}{int((diff > bound).sum())} of {diff.numel()} elements out "
        f"of bound; worst at flat index {worst}: |diff| = {diff.flatten()[worst].item():.3g}, "
        f"bound {bound.flatten()[worst].item():.3g} (ratio {ratio.flatten()[worst].item():.3g})"
    )
