"""LRP through the MLPs of timm's blocks: ``Mlp`` (GELU) and the gated ``GluMlp`` / ``SwiGLU``.

The rules of :mod:`relreg.explain.lrp_rules` (LRP: Bach, Binder, Montavon, Klauschen, Mueller &
Samek, PLoS ONE 2015; transformer rules: Chefer, Gur & Wolf, "Transformer Interpretability Beyond
Attention Visualization", CVPR 2021):

- ``Mlp``: ``fc2(norm(act(fc1(x))))``: alpha1-beta0 through ``fc2`` and ``fc1``, the activation and
  the (optional, ``scale_mlp``) sub-norm identity.
- ``SwiGLU`` (``act(fc1_g(x)) * fc1_x(x)``, split weights) and ``GluMlp`` (one ``fc1`` whose output
  halves are the gate and the value; ``gate_last`` says which is which): alpha1-beta0 through
  ``fc2``, the sub-norm identity, the product by :func:`relreg.explain.lrp_rules.product_rule`
  (half of the relevance to each operand), the activation (SiLU) identity, alpha1-beta0 through
  the gate's and the value's weights, and the two relevances of the MLP input summed (a fork).

Used by the EVA (:mod:`relreg.explain.lrp_eva`) and BEiT (:mod:`relreg.explain.lrp_beit`) blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relreg.explain.lrp_rules import linear_alpha_beta, product_rule

__all__ = ["MlpCache", "check_mlp", "mlp_forward", "mlp_relprop"]


@dataclass
class MlpCache:
    """Activations of one MLP that the rules need.

    Attributes:
        x: the MLP input ``(B, N, D)``.
        g: ``fc2``'s input ``(B, N, hidden)``.
        gate: the activated gate of a gated MLP ``(B, N, hidden)`` (None for ``Mlp``).
        value: the value it multiplies ``(B, N, hidden)`` (None for ``Mlp``).
    """

    x: Tensor
    g: Tensor
    gate: Tensor | None = None
    value: Tensor | None = None


def _is_timm(module: nn.Module, cls: type) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


def check_mlp(where: str, mlp: nn.Module) -> None:
    """Raise ``TypeError`` unless ``mlp`` is timm's ``Mlp``, ``GluMlp`` or ``SwiGLU`` on tokens.

    Args:
        where: the module's path in the model, for the message (``"blocks[0].mlp"``).
        mlp: the module.
    """
    from timm.layers import GluMlp, Mlp, SwiGLU

    if _is_timm(mlp, Mlp) or _is_timm(mlp, GluMlp):
        ok = isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
    elif _is_timm(mlp, SwiGLU):
        linears = (mlp.fc1_g, mlp.fc1_x, mlp.fc2)
        ok = all(isinstance(m, nn.Linear) for m in linears)
    else:
        ok = False
    if not ok:
        raise TypeError(
            f"Expected {where} to be timm's Mlp, GluMlp or SwiGLU with Linear layers, but got "
            f"{type(mlp).__name__}: the LRP rules cover only these MLPs."
        )


def mlp_forward(mlp: nn.Module, x: Tensor) -> tuple[Tensor, MlpCache]:
    """Run ``mlp`` (checked by :func:`check_mlp`) on ``x`` ``(B, N, D)`` as timm does.

    Returns:
        The output ``(B, N, D)`` and the activations for :func:`mlp_relprop`.
    """
    from timm.layers import Mlp, SwiGLU

    gate = value = None
    if isinstance(mlp, Mlp):
        h = mlp.act(mlp.fc1(x))
    elif isinstance(mlp, SwiGLU):
        gate, value = mlp.act(mlp.fc1_g(x)), mlp.fc1_x(x)
        h = gate * value
    else:  # GluMlp
        first, second = mlp.fc1(x).chunk(2, dim=-1)
        if mlp.gate_last:
            gate, value = mlp.act(second), first
            h = value * gate
        else:
            gate, value = mlp.act(first), second
            h = gate * value
    g = mlp.norm(mlp.drop1(h))
    return mlp.drop2(mlp.fc2(g)), MlpCache(x, g, gate, value)


def mlp_relprop(mlp: nn.Module, cache: MlpCache, relevance: Tensor) -> Tensor:
    """Relevance of the MLP output ``(B, N, D)`` -> relevance of its input ``(B, N, D)``."""
    from timm.layers import SwiGLU

    c = cache
    r_g = linear_alpha_beta(c.g, mlp.fc2.weight, relevance)  # drop1, norm: identity
    if c.gate is None or c.value is None:
        return linear_alpha_beta(c.x, mlp.fc1.weight, r_g)  # act: identity
    r_gate, r_value = product_rule(c.gate, c.value, r_g)  # then act: identity
    if isinstance(mlp, SwiGLU):  # fork: the gate's and the value's relevances summed
        return linear_alpha_beta(c.x, mlp.fc1_g.weight, r_gate) + linear_alpha_beta(
            c.x, mlp.fc1_x.weight, r_value
        )
    halves = [r_value, r_gate] if mlp.gate_last else [r_gate, r_value]
    return linear_alpha_beta(c.x, mlp.fc1.weight, torch.cat(halves, dim=-1))
