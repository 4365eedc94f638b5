"""Layer-wise relevance propagation (LRP) rules, written from the papers, not from released code.

LRP: Bach, Binder, Montavon, Klauschen, Mueller & Samek, "On Pixel-Wise Explanations for
Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation", PLoS ONE 2015, with the
transformer rules of Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
Visualization", CVPR 2021:

- ``Linear`` layers (``qkv``, ``proj``, ``fc1``, ``fc2``, the heads): LRP-alpha-beta with
  ``alpha = 1, beta = 0``: ``R_i = sum_j (x_i^+ w_ij^+ + x_i^- w_ij^-) / z_j^+ R_j`` with
  ``z_j^+ = sum_i (x_i^+ w_ij^+ + x_i^- w_ij^-)``; biases take no relevance. It conserves
  ``sum_i R_i = sum_j R_j`` wherever ``z_j^+ > 0``.
- Rotary position embedding (EVA-02, RoPE-ViT, DINOv3: ``q' = R_n q``, ``k' = R_n k`` with ``R_n``
  a fixed rotation per position ``n``, independent of the input): gradient x input (LRP-0) with
  the weight ``R_n`` at each position (:func:`rotation_rule`): ``R_i = sum_j x_i R_ji / z_j R_j``
  with ``z_j = sum_i x_i R_ji``. Not the alpha1-beta0 of the learned ``Linear`` layers: with two
  inputs per output, alpha1-beta0 passes nothing on from every output whose two contributions are
  both negative (16-63% of the relevance reaching the rotation on the test models); LRP-0
  conserves wherever ``z_j != 0`` and is the identity at zero angle, as for the unrotated prefix
  tokens, which pass unchanged. ``R_n`` is built by applying the model's own rotation function to
  the identity basis, so the interleaved and the rotate-half layouts are the model's own.
- The patch-embedding convolution (the input layer): the ``z^B`` (bounded) rule with the lowest
  and highest input value ``l, h``, taken per image as the image's own minimum and maximum (the
  convention of the paper's code): ``R_i = sum_j (x_i w_ij - l w_ij^+ - h w_ij^-) / z_j R_j``.
- LayerNorm / RmsNorm, GELU, SiLU, softmax, dropout, DropPath, LayerScale (and the ``gamma_1`` /
  ``gamma_2`` vectors of EVA and BEiT blocks), the attention scale, the q/k norms and the sub-norms
  (EVA-02's ``scale_mlp`` norm inside the MLP, the attention's ``norm``): identity (the relevance
  passes unchanged).
- The gated MLP's product (SwiGLU / GLU: ``act(fc1_g(x)) * fc1_x(x)``): the matrix-product rule
  applied elementwise, gradient x input for each operand, each halved (:func:`product_rule`); as
  ``a * b * R / (a b) = R``, each operand gets half of the relevance. The activation is identity.
- The two matrix products of attention (``q k^T`` and ``A v``): gradient x input for each operand,
  ``R_x = x * d z / d x . (R / z)``, then each operand's relevance halved, which conserves the
  total.
- Additions (the two residuals per block, the position embedding, DeiT's head average):
  gradient x input for each operand, then each part rescaled so that its sum is
  ``sum(R) * |sum R_a| / (|sum R_a| + |sum R_b|)``, which conserves the total.
- A constant added to the attention logits (BEiT's relative position bias, per block or shared:
  ``q k^T * scale + bias``): the relevance at the attention probabilities passes the softmax
  (identity) and the addition rule above splits it between ``q k^T`` and the bias; the bias's
  share leaves the network (as the position embedding's does), ``q k^T``'s goes on through the
  matrix-product rule.
- The fork before each residual (the skip and the branch read the same tokens): relevances summed.
- Token read-out (``global_pool="token"``): the CLS token gets the head's relevance (DeiT: the
  CLS and distillation tokens through ``head`` / ``head_dist``, whose average is an addition);
  average pooling (``"avg"``) spreads it over the pooled tokens by gradient x input.

This module holds the layer rules; the identity, fork and read-out rules are applied where
:mod:`relreg.explain.lrp_vit`, :mod:`relreg.explain.lrp_eva` and :mod:`relreg.explain.lrp_beit`
walk the model. Every sum of a normalisation is taken per sample,
so a batched call equals one call per image. Divisions are ``eps``-stabilised and give 0 where the
denominator is 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EPS",
    "safe_divide",
    "per_sample_sum",
    "linear_alpha_beta",
    "conv_zb",
    "matmul_rule",
    "product_rule",
    "rotation_rule",
    "add_rule",
]

EPS = 1e-9


def safe_divide(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """``a / b`` with ``b`` pushed ``eps`` away from 0 (keeping its sign); 0 where ``b == 0``."""
    den = b + torch.where(b >= 0, eps, -eps)
    return torch.where(b == 0, torch.zeros_like(a * b), a / den)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` broadcasting against ``like``."""
    return v.view(-1, *([1] * (like.ndim - 1)))


def per_sample_sum(r: Tensor) -> Tensor:
    """Per-sample total relevance ``(B,)`` of ``r`` ``(B, ...)``."""
    return r.flatten(1).sum(dim=1)


def linear_alpha_beta(x: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    """LRP-alpha1-beta0 through ``z = x W^T (+ b)``: positive contributions only, biases ignored.

    Args:
        x: layer input ``(..., in)``.
        weight: ``(out, in)``.
        relevance: relevance of the output ``(..., out)``.

    Returns:
        Relevance of the input ``(..., in)``.
    """
    xp = x.clamp(min=0)
    xn = x.clamp(max=0)
    wp = weight.clamp(min=0)
    wn = weight.clamp(max=0)
    z = F.linear(xp, wp) + F.linear(xn, wn)
    s = safe_divide(relevance, z)
    return xp * (s @ wp) + xn * (s @ wn)


def conv_zb(x: Tensor, conv: nn.Conv2d, relevance: Tensor) -> Tensor:
    """The ``z^B`` rule through the input convolution, bounds = each image's min and max.

    Args:
        x: the convolution's input ``(B, C, H, W)`` (the images).
        conv: the convolution (zero padding); its bias is ignored.
        relevance: relevance of the output ``(B, D, h, w)``.

    Returns:
        Relevance of the pixels ``(B, C, H, W)``.
    """
    low = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x)
    high = x.amax(dim=(1, 2, 3), keepdim=True).expand_as(x)
    w = conv.weight
    wp = w.clamp(min=0)
    wn = w.clamp(max=0)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    z = (
        F.conv2d(x, w, None, *args)
        - F.conv2d(low, wp, None, *args)
        - F.conv2d(high, wn, None, *args)
    )
    s = safe_divide(relevance, z)

    def back(weight: Tensor) -> Tensor:
        return torch.nn.grad.conv2d_input(x.shape, weight, s, *args)

    return x * back(w) - low * back(wp) - high * back(wn)


def matmul_rule(
    a: Tensor,
    b: Tensor,
    relevance: Tensor,
    divide: Callable[[Tensor, Tensor], Tensor] = safe_divide,
) -> tuple[Tensor, Tensor]:
    """Gradient x input through ``z = a @ b``, each operand's relevance halved.

    Args:
        a: ``(..., n, k)``.
        b: ``(..., k, m)``.
        relevance: relevance of ``z`` ``(..., n, m)``.
        divide: the stabilised ``relevance / z`` (the CVPR 2021 baseline rules use their own,
            :func:`relreg.explain.lrp_baseline.safe_div`).

    Returns:
        Relevances of ``a`` and ``b`` (same shapes); each sums to half of ``relevance``.
    """
    s = divide(relevance, a @ b)
    ra = a * (s @ b.transpose(-2, -1))
    rb = b * (a.transpose(-2, -1) @ s)
    return ra / 2, rb / 2


def product_rule(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient x input through the elementwise product ``z = a * b``, each operand halved.

    ``R_a = a * (d z / d a) * R / z / 2 = a b R / z / 2``, and the same for ``b``: each operand gets
    half of ``R`` (0 where ``z == 0``, less the ``eps`` stabiliser elsewhere).

    Args:
        a: first operand ``(..., n)`` (the gated MLP's activated gate).
        b: second operand, same shape (the gated MLP's value).
        relevance: relevance of ``z`` ``(..., n)``.

    Returns:
        Relevances of ``a`` and ``b`` (same shapes); each sums to half of ``relevance``.
    """
    z = a * b
    half = z * safe_divide(relevance, z) / 2
    return half, half.clone()


def rotation_rule(x: Tensor, rotation: Tensor, relevance: Tensor) -> Tensor:
    """Gradient x input (LRP-0) through a per-position linear map ``y_n = R_n x_n`` (no bias).

    ``R_i = sum_j x_i R_ji / z_j R_j`` with ``z_j = sum_i x_i R_ji`` (the output itself), the
    division :func:`safe_divide`'s (``eps``-stabilised, 0 where ``z_j == 0``). It conserves
    ``sum_i R_i = sum_j R_j`` wherever ``z_j != 0`` (less the stabiliser), and at zero angle
    (``R_n`` the identity) returns ``relevance`` unchanged. The rotary embedding's ``R_n`` is fixed,
    not learned, and mixes each pair of coordinates; the alpha1-beta0 of :func:`linear_alpha_beta`
    would pass nothing on from every output whose two contributions are both negative.

    Args:
        x: the map's input ``(..., P, d)`` (queries or keys of the rotated tokens, e.g.
            ``(B, h, P, d)``).
        rotation: ``R_n`` as ``(out, in)`` matrices ``(..., P, d, d)``, broadcastable against
            ``x``'s leading dimensions (``(P, d, d)``, or ``(h, P, d, d)`` with one per head).
        relevance: relevance of the output ``(..., P, d)``.

    Returns:
        Relevance of the input ``(..., P, d)``.
    """
    z = (rotation @ x.unsqueeze(-1)).squeeze(-1)
    s = safe_divide(relevance, z).unsqueeze(-2)
    return x * (s @ rotation).squeeze(-2)


def add_rule(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient x input through ``z = a + b``, normalised per sample so the total is conserved.

    Each part ``R_a = a R / z`` is rescaled to sum to ``sum(R) |sum R_a| / (|sum R_a| + |sum R_b|)``
    (sums over all but the batch dimension).

    Args:
        a: first operand, broadcastable to ``relevance`` ``(B, ...)``.
        b: second operand, broadcastable to ``relevance``.
        relevance: relevance of the sum ``(B, ...)``.

    Returns:
        Relevances of ``a`` and ``b``, both of ``relevance``'s shape.
    """
    a = a.expand_as(relevance)
    b = b.expand_as(relevance)
    s = safe_divide(relevance, a + b)
    ra = a * s
    rb = b * s
    sa = per_sample_sum(ra)
    sb = per_sample_sum(rb)
    total = per_sample_sum(relevance)
    share = sa.abs() + sb.abs()
    fa = safe_divide(sa.abs(), share) * total
    fb = safe_divide(sb.abs(), share) * total
    ra = ra * _per_sample(safe_divide(fa, sa), ra)
    rb = rb * _per_sample(safe_divide(fb, sb), rb)
    return ra, rb
