"""Shared by the LRP tests: gradient x input by autograd (the naive reference of every rule) and
the relevance the rules' stabilised divisions keep back (the slack of a conservation check)."""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import torch

from relreg.explain import lrp_rules as R
from relreg.explain import lrp_vit as V

__all__ = ["grad_x_input", "unpassed_relevance"]


@contextmanager
def unpassed_relevance():
    """Per sample ``(B,)``, the relevance the rules' stabilised divisions do not pass on.

    Each ``safe_divide(a, b)`` returns ``a / (b +- eps)`` (0 where ``b == 0``): multiplied back by
    ``b`` it gives ``a`` less ``|a| eps / (|b| + eps)`` (all of ``a`` where ``b == 0``). A rule's
    conservation is off by at most what its divisions keep back; the yielded list collects it,
    one ``(B,)`` tensor per division, while the block runs.
    """
    kept: list[torch.Tensor] = []
    divide = R.safe_divide

    def recording(a, b, eps=R.EPS):
        u = torch.where(b == 0, a.abs(), a.abs() * eps / (b.abs() + eps))
        kept.append(u.flatten(1).sum(1) if u.dim() > 1 else u)
        return divide(a, b, eps)

    with (
        mock.patch.object(R, "safe_divide", recording),
        mock.patch.object(V, "safe_divide", recording),
        mock.patch.object(R.matmul_rule, "__defaults__", (recording,)),
    ):
        yield kept


def grad_x_input(fn, inputs, relevance):
    """Gradient x input: ``x_i * d fn / d x_i . (R / z)`` for each input (the same 1e-9
    stabiliser as the implementation: ``z`` pushed away from 0, and 0 where ``z == 0``)."""
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        z = fn(*xs)
        zd = z.detach()
        s = torch.where(zd == 0, 0.0, relevance / (zd + 1e-9 * (2 * (zd >= 0) - 1)))
        grads = torch.autograd.grad(z, xs, s)
    return [x.detach() * g for x, g in zip(xs, grads, strict=True)]
