"""The LRP rules of the CVPR 2021 paper's baselines: full LRP and partial LRP as the paper ran them.

Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention Visualization", CVPR 2021,
evaluate their method against full LRP (Bach, Binder, Montavon, Klauschen, Mueller & Samek, "On
Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation",
PLoS ONE 2015) and partial LRP (Voita, Talbot, Moiseev, Sennrich & Titov, "Analyzing Multi-Head
Self-Attention", ACL 2019). Those two baselines were not computed with the paper's own
conservative rules (:mod:`relreg.explain.lrp_rules`, ``rules="conservative"``) but with standard
LRP layers. This module is that rule set (``rules="cvpr2021_baseline"`` of
:func:`relreg.explain.lrp.lrp` and :func:`relreg.explain.lrp.partial_lrp`), re-derived from a
reading of the paper's public code in the repository ``hila-chefer/Transformer-Explainability``:
``baselines/ViT/ViT_orig_LRP.py`` (the walk through the model, the ``"full"`` and ``"last_layer"``
read-outs), ``modules/layers_lrp.py`` (the layer rules) and
``baselines/ViT/ViT_explanation_generator.py`` (``LRP.generate_LRP``: a one-hot start, ``alpha=1``).

The rules, with ``safe(R, z) = R / (z + 1e-9)``, 0 where ``z == 0`` (that code's stabiliser):

- ``Linear`` (``qkv``, ``proj``, ``fc1``, ``fc2``, the heads): alpha-beta with ``alpha = 1``,
  ``beta = 0``, biases ignored, with the positive and the negative inputs normalised *apart*:
  ``R_i = x_i^+ sum_j w_ji^+ safe(R_j, z_j^+) + x_i^- sum_j w_ji^- safe(R_j, z_j^-)`` with
  ``z_j^+ = sum_i x_i^+ w_ji^+`` and ``z_j^- = sum_i x_i^- w_ji^-`` (both >= 0). This is
  ``layers_lrp.py`` at commit 3c9da22 (and the rule of the repository's
  ``BERT_explainability/modules/layers_lrp.py``); its version at commit 07d8c72 divides by
  ``z^+ + z^-`` and ``2 z^-`` instead.
- Additions (the two residuals per block, the position embedding, DeiT's head average): gradient x
  input of each operand, ``R_a = a safe(R, a + b)``, ``R_b = b safe(R, a + b)``, not renormalised.
- The fork before each residual (``Clone``): ``R_x = x (safe(R_skip, x) + safe(R_branch, x))``.
- The matrix products ``q k^T`` and ``A v``: gradient x input for each operand, each halved;
  ``q k^T`` is taken without the attention scale (the scale takes no relevance).
- LayerNorm / RmsNorm, GELU, softmax, dropout, DropPath, LayerScale, the q/k norms: identity.
- CLS read-out (``IndexSelect``): ``R = x_0 safe(R, x_0)``; DeiT's CLS and distillation tokens
  alike; average pooling (``global_pool="avg"``, not in that code): gradient x input of the mean.
- The patch-embedding convolution: the ``z^B`` rule, bounds = each image's min and max
  (:func:`relreg.explain.lrp_rules.conv_zb`; that code applies it to 3-channel inputs only).
- ``lrp`` (``method="full"``): the prefix tokens' relevance and the position embedding's share are
  dropped, the pixel relevance is summed over the colour channels. ``partial_lrp``
  (``method="last_layer"``): the last block's ``R_A`` (the halved share of ``A v``), positive part,
  mean over heads, read-out row (CLS row), patch columns.

Where the rule set does not conserve relevance: every ``Linear`` layer hands each output's
relevance out twice, once to its positive inputs and once more to its negative inputs, so
``sum_i R_i = sum_j R_j ([z_j^+ > 0] + [z_j^- > 0])``: up to twice the relevance per layer (twice
for each output with ``z_j^+ > 0`` and ``z_j^- > 0``, the usual case for LayerNorm and GELU
outputs). The head thus doubles a one-hot start; each attention and MLP branch passes two
``Linear`` layers. The additions, the fork, the read-outs, the halved products and ``z^B`` conserve
(where the denominators are not 0, up to the ``1e-9`` stabiliser; an addition's two parts can be
large and of opposite signs where ``a + b`` is small); the prefix tokens and the position embedding
take their share out at the input. With one sign part per layer (e.g. non-negative weights) the map
conserves the start relevance like the conservative rules.

Every rule is linear in the relevance, so a contrast (``foil``) or weights ``(B, K)`` start from
``w - one_hot(foil)`` in one pass. Every sum runs within a sample: a batched call equals one call
per image (the public code explains one image at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relreg.explain import lrp_rules, lrp_vit
from relreg.explain._contract import Target, target_weights
from relreg.explain.lrp_rules import EPS, conv_zb
from relreg.explain.lrp_vit import BlockCache, ViTForward, _prefix_values
from relreg.validate import check_choice

__all__ = [
    "RULES",
    "check_rules",
    "safe_div",
    "linear_rule",
    "add_rule",
    "fork_rule",
    "matmul_rule",
    "start_relevance",
    "head_relprop",
    "block_relprop",
    "embed_relprop",
    "propagate",
]

RULES = ("conservative", "cvpr2021_baseline")


def check_rules(rules: str) -> None:
    """Raise ``ValueError`` unless ``rules`` is one of :data:`RULES`."""
    check_choice("rules", rules, RULES)


# ------------------------------------------------------------------------------------ the rules


def safe_div(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """``a / (b + eps)``, 0 where ``b == 0`` (the public code's stabiliser: ``+eps`` whatever the
    sign of ``b``)."""
    den = b + eps
    den = torch.where(den == 0, torch.full_like(den, eps), den)
    return torch.where(b == 0, torch.zeros_like(a * b), a / den)


def linear_rule(x: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    """Alpha-1-beta-0 through ``z = x W^T (+ b)``, positive and negative inputs normalised apart.

    Args:
        x: layer input ``(..., in)``.
        weight: ``(out, in)``.
        relevance: relevance of the output ``(..., out)``.

    Returns:
        Relevance of the input ``(..., in)``; its sum is ``sum_j R_j ([z_j^+ > 0] + [z_j^- > 0])``.
    """
    xp = x.clamp(min=0)
    xn = x.clamp(max=0)
    wp = weight.clamp(min=0)
    wn = weight.clamp(max=0)
    sp = safe_div(relevance, F.linear(xp, wp))
    sn = safe_div(relevance, F.linear(xn, wn))
    return xp * (sp @ wp) + xn * (sn @ wn)


def add_rule(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient x input through ``z = a + b``: ``R_a = a R / z``, ``R_b = b R / z`` (elementwise).

    Args:
        a: first operand, broadcastable to ``relevance`` ``(B, ...)``.
        b: second operand, broadcastable to ``relevance``.
        relevance: relevance of the sum ``(B, ...)``.

    Returns:
        Relevances of ``a`` and ``b``, both of ``relevance``'s shape.
    """
    s = safe_div(relevance, a + b)
    return a * s, b * s


def fork_rule(x: Tensor, *relevances: Tensor) -> Tensor:
    """A tensor read by several layers (``Clone``; a one-token read-out): ``x sum_k safe(R_k, x)``.

    Args:
        x: the tensor ``(...)``.
        *relevances: the relevance each reader returns, each of ``x``'s shape.

    Returns:
        Relevance of ``x`` (the relevances summed, 0 where ``x == 0``).
    """
    return x * sum(safe_div(r, x) for r in relevances)


def matmul_rule(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient x input through ``z = a @ b`` for each operand, each halved.

    Args:
        a: ``(..., n, k)``.
        b: ``(..., k, m)``.
        relevance: relevance of ``z`` ``(..., n, m)``.

    Returns:
        Relevances of ``a`` and ``b`` (same shapes); each sums to half of ``relevance``.
    """
    return lrp_rules.matmul_rule(a, b, relevance, divide=safe_div)


# ------------------------------------------------------------------------ through the model


def start_relevance(logits: Tensor, target: Target, foil: Tensor | None) -> Tensor:
    """The start ``(B, K)``: ``one_hot(target)`` (weights as given; a target function's gradient at
    ``logits``), minus ``one_hot(foil)`` with a foil."""
    w = target_weights(target, logits.detach())
    if foil is not None:
        w = w - F.one_hot(foil, logits.shape[1]).to(w.dtype)
    return w


def head_relprop(model: nn.Module, fwd: ViTForward, relevance: Tensor) -> Tensor:
    """Relevance of the logits ``(B, K)`` -> relevance of the final tokens ``(B, N, D)``."""
    out = torch.zeros_like(fwd.tokens)
    if hasattr(model, "head_dist"):
        halves = [o / 2 for o in fwd.head_outputs]
        r_cls, r_dist = add_rule(halves[0], halves[1], relevance)
        r_cls = linear_rule(fwd.head_inputs[0], model.head.weight, r_cls)
        r_dist = linear_rule(fwd.head_inputs[1], model.head_dist.weight, r_dist)
        out[:, 0] = fork_rule(fwd.tokens[:, 0], r_cls)
        out[:, 1] = fork_rule(fwd.tokens[:, 1], r_dist)
        return out
    r_pooled = linear_rule(fwd.head_inputs[0], model.head.weight, relevance)  # fc_norm: identity
    if model.global_pool == "token":
        out[:, 0] = fork_rule(fwd.tokens[:, 0], r_pooled)
    else:
        patches = fwd.tokens[:, model.num_prefix_tokens :]
        mean = patches.mean(dim=1, keepdim=True)
        out[:, model.num_prefix_tokens :] = (
            patches / patches.shape[1] * safe_div(r_pooled[:, None], mean)
        )
    return out


def block_relprop(
    blk: nn.Module, cache: BlockCache, relevance: Tensor, attention_only: bool = False
) -> tuple[Tensor | None, Tensor]:
    """Relevance through one timm ``Block``.

    Args:
        blk: the block.
        cache: its activations from :func:`relreg.explain.lrp_vit.functional_forward`.
        relevance: relevance of the block's output ``(B, N, D)``.
        attention_only: stop at the attention probabilities (the input relevance is then None).

    Returns:
        Relevance of the block's input ``(B, N, D)`` and of its attention probabilities
        ``(B, h, N, N)`` (the halved share of ``A v``).
    """
    c = cache
    attn = blk.attn
    b, heads, n, head_dim = c.v.shape
    r_skip, r_u2 = add_rule(c.x1, c.u2, relevance)
    r_g = linear_rule(c.g, blk.mlp.fc2.weight, r_u2)
    r_x1 = fork_rule(c.x1, r_skip, linear_rule(c.h2, blk.mlp.fc1.weight, r_g))
    r_skip, r_u1 = add_rule(c.x, c.u1, r_x1)
    r_o = linear_rule(c.o, attn.proj.weight, r_u1)
    r_attn, r_v = matmul_rule(c.attn_drop, c.v, r_o.reshape(b, n, heads, head_dim).transpose(1, 2))
    if attention_only:
        return None, r_attn
    r_q, r_kt = matmul_rule(c.qs / attn.scale, c.k.transpose(-2, -1), r_attn)
    r_qkv = torch.stack([r_q, r_kt.transpose(-2, -1), r_v]).permute(1, 3, 0, 2, 4)
    r_h1 = linear_rule(c.h1, attn.qkv.weight, r_qkv.reshape(b, n, 3 * heads * head_dim))
    return fork_rule(c.x, r_skip, r_h1), r_attn


def embed_relprop(model: nn.Module, fwd: ViTForward, relevance: Tensor) -> Tensor:
    """Relevance of the first block's input ``(B, N, D)`` -> the convolution's input
    ``(B, C, H', W')`` (the images, padded when ``dynamic_img_pad``); the prefix tokens' relevance
    and the position embedding's share are dropped."""
    n_prefix = relevance.shape[1] - fwd.patches.shape[1]
    if fwd.pos is None:
        r_patches = relevance[:, n_prefix:]
    elif fwd.pos_on_prefix:
        r_patches = add_rule(_prefix_values(model, fwd), fwd.pos, relevance)[0][:, n_prefix:]
    else:
        r_patches = add_rule(fwd.patches, fwd.pos, relevance[:, n_prefix:])[0]
    b, _, d = r_patches.shape
    r_conv = r_patches.transpose(1, 2).reshape(b, d, *fwd.grid)
    return conv_zb(fwd.pixels, model.patch_embed.proj, r_conv)


def propagate(
    model: nn.Module, fwd: ViTForward, relevance: Tensor, down_to: int = 0, pixels: bool = False
) -> tuple[dict[int, Tensor], Tensor | None]:
    """:func:`relreg.explain.lrp_vit.propagate` under these rules: ``{block index: attention
    relevance (B, h, N, N)}`` for blocks ``>= down_to`` and, when ``pixels``, the pixel relevance
    ``(B, C, H', W')``."""
    return lrp_vit.propagate(
        model, fwd, relevance, down_to, pixels, (head_relprop, block_relprop, embed_relprop)
    )
