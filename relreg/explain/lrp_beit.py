"""LRP through timm's ``Beit`` models (BEiT, BEiT v2): relative position bias on the logits.

The relevance propagation of Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
Visualization", CVPR 2021 (LRP: Bach, Binder, Montavon, Klauschen, Mueller & Samek, PLoS ONE
2015) with the rules of :mod:`relreg.explain.lrp_rules`, through :class:`timm.models.beit.Beit`
and its own ``Block`` / ``Attention``. What these blocks add to a ViT block, and the rule at each:

- The relative position bias, per block (``relative_position_bias_table``) or shared
  (``model.rel_pos_bias``): the attention logits are ``q k^T * scale + bias`` with the bias a
  constant (learned, but independent of the input). The relevance at the attention probabilities
  passes the softmax unchanged (identity), then :func:`relreg.explain.lrp_rules.add_rule` splits
  it between ``q k^T`` and the bias: the bias's share leaves the network (like the position
  embedding's), the ``q k^T`` share goes on through the matrix-product rule. This is why a BEiT's
  pixel map sums to less than the start relevance even without an absolute position embedding.
- ``q_bias`` / ``v_bias``: biases, no relevance. ``gamma_1`` / ``gamma_2`` (layer scale):
  identity. The MLP (``Mlp``, or ``SwiGLU`` with ``swiglu_mlp``): :mod:`relreg.explain.lrp_mlp`.

The patch embedding, the CLS token, the absolute position embedding (when the model has one), the
read-out (``global_pool`` ``"avg"`` with ``fc_norm``, or ``"token"``) and the head are those of
:mod:`relreg.explain.lrp_vit`, whose :func:`head_relprop`, :func:`embed_relprop` and
:func:`propagate` run the walk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relreg.explain.lrp_mlp import MlpCache, check_mlp, mlp_forward
from relreg.explain.lrp_rules import add_rule, matmul_rule
from relreg.explain.lrp_vit import (
    BlockCache,
    ViTForward,
    _check_heads,
    _check_patch_embed,
    _same_method,
    attention_relprop,
    embed_forward,
    head_forward,
    qkv_relprop,
)

__all__ = [
    "BeitBlockCache",
    "check_beit_model",
    "functional_forward",
    "logit_relprop",
    "block_relprop",
]


# ------------------------------------------------------------------------------- model checks


def check_beit_model(model: nn.Module) -> None:
    """Raise unless ``model`` is a timm ``Beit`` whose layers the LRP rules cover.

    Expected: :class:`timm.models.beit.Beit` with its own ``Block`` / ``Attention`` (``Linear``
    projections; ``Mlp`` or ``SwiGLU``), timm's ``PatchEmbed``, ``global_pool`` ``"avg"`` or
    ``"token"`` and a ``Linear`` head.

    Raises:
        TypeError: for a model or a layer of another kind.
        ValueError: for an unsupported configuration (pooling, head).
    """
    from timm.models.beit import Attention, Beit, Block, RelativePositionBias

    methods = ("forward", "forward_features", "forward_head")
    if not isinstance(model, Beit) or not _same_method(model, Beit, methods):
        raise TypeError(
            f"Expected a timm Beit (timm.models.beit.Beit), but got {type(model).__name__}."
        )
    if len(model.blocks) == 0:
        raise TypeError("Expected a Beit with a non-empty `blocks` sequence, but got none.")
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, Block) or not _same_method(blk, Block, ("forward",)):
            raise TypeError(
                f"Expected blocks[{i}] to be timm's BEiT Block (timm.models.beit.Block), but got "
                f"{type(blk).__name__}: the LRP rules cover only its layers."
            )
        attn = blk.attn
        if (
            not isinstance(attn, Attention)
            or not _same_method(attn, Attention, ("forward", "_get_rel_pos_bias"))
            or not isinstance(attn.qkv, nn.Linear)
            or not isinstance(attn.proj, nn.Linear)
        ):
            raise TypeError(
                f"Expected blocks[{i}].attn to be timm's BEiT Attention (Linear qkv/proj), but got "
                f"{type(attn).__name__}."
            )
        check_mlp(f"blocks[{i}].mlp", blk.mlp)
    shared = model.rel_pos_bias
    if shared is not None and (
        not isinstance(shared, RelativePositionBias)
        or not _same_method(shared, RelativePositionBias, ("forward",))
    ):
        raise TypeError(
            "Expected rel_pos_bias to be timm's RelativePositionBias (a constant on the logits), "
            f"but got {type(shared).__name__}."
        )
    _check_patch_embed(model)
    if model.global_pool not in ("token", "avg"):
        raise ValueError(
            "Expected global_pool 'token' or 'avg' (patch tokens only) for LRP, but got "
            f"global_pool={model.global_pool!r}."
        )
    _check_heads(model)


# --------------------------------------------------------------------------- functional forward


@dataclass
class BeitBlockCache(BlockCache):
    """A :class:`relreg.explain.lrp_vit.BlockCache` with the logits' bias and the MLP's activations.

    Attributes:
        bias: the constant added to ``q k^T * scale``, ``(1, h, N, N)`` (the block's relative
            position bias plus the shared one), or None.
        mlp: the MLP's activations.
    """

    bias: Tensor | None
    mlp: MlpCache


def _qkv(attn: nn.Module, x: Tensor) -> Tensor:
    """``qkv`` ``(B, N, 3 A)`` as the attention computes it (``q_bias``, zero ``k_bias``,
    ``v_bias``)."""
    if attn.q_bias is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)


def _block_forward(
    blk: nn.Module, x: Tensor, shared_bias: Tensor | None
) -> tuple[Tensor, BeitBlockCache]:
    attn = blk.attn
    b, n, _ = x.shape
    h1 = blk.norm1(x)
    q, k, v = _qkv(attn, h1).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    qs = q * attn.scale
    logits = qs @ k.transpose(-2, -1)
    bias = None
    if attn.relative_position_bias_table is not None:
        bias = attn._get_rel_pos_bias()
        logits = logits + bias
    if shared_bias is not None:
        logits = logits + shared_bias  # a second addition, as timm's
        bias = shared_bias if bias is None else bias + shared_bias
    a = logits.softmax(dim=-1)
    ad = attn.attn_drop(a)
    o = (ad @ v).transpose(1, 2).reshape(b, n, -1)
    u1 = attn.proj_drop(attn.proj(o))
    if blk.gamma_1 is not None:
        u1 = blk.gamma_1 * u1
    u1 = blk.drop_path1(u1)
    x1 = x + u1
    h2 = blk.norm2(x1)
    u2, mlp = mlp_forward(blk.mlp, h2)
    if blk.gamma_2 is not None:
        u2 = blk.gamma_2 * u2
    u2 = blk.drop_path2(u2)
    cache = BeitBlockCache(x, h1, qs, k, v, a, ad, o, u1, x1, h2, mlp.g, u2, bias, mlp)
    return x1 + u2, cache


def functional_forward(model: nn.Module, images: Tensor) -> ViTForward:
    """Run ``model`` (checked by :func:`check_beit_model`) layer by layer, keeping what LRP needs.

    Its ``logits`` equal ``model(images)`` (up to the unfused attention's rounding); its
    ``blocks`` are :class:`BeitBlockCache` s.
    """
    e = embed_forward(model, images)
    tokens = model.pos_drop(e.tokens)
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    caches = []
    for blk in model.blocks:
        tokens, cache = _block_forward(blk, tokens, shared)
        caches.append(cache)
    tokens = model.norm(tokens)
    inputs, outputs, logits = head_forward(model, tokens)
    return ViTForward(
        e.pixels, e.grid, e.patches, e.pos, e.pos_on_prefix, caches, tokens, inputs, outputs, logits
    )


# ------------------------------------------------------------------------ relevance propagation


def logit_relprop(cache: BeitBlockCache, relevance: Tensor) -> tuple[Tensor, Tensor | None]:
    """Relevance of the logits ``q k^T * scale + bias`` ``(B, h, N, N)`` (= that of the attention
    probabilities: the softmax is identity) -> the ``q k^T`` share and the bias's share (None
    without a bias), by :func:`relreg.explain.lrp_rules.add_rule`."""
    if cache.bias is None:
        return relevance, None
    return add_rule(cache.qs @ cache.k.transpose(-2, -1), cache.bias, relevance)


def block_relprop(
    blk: nn.Module, cache: BeitBlockCache, relevance: Tensor, attention_only: bool = False
) -> tuple[Tensor | None, Tensor]:
    """Relevance through one BEiT ``Block``.

    Args:
        blk: the block.
        cache: its activations from :func:`functional_forward`.
        relevance: relevance of the block's output ``(B, N, D)``.
        attention_only: stop at the attention probabilities (the input relevance is then None).

    Returns:
        Relevance of the block's input ``(B, N, D)`` and of its attention probabilities
        ``(B, h, N, N)`` (what arrives at the softmax output). The input's total is the output's
        less the bias's share (:func:`logit_relprop`).
    """
    c = cache
    r_x, r_attn, r_v = attention_relprop(blk, c, c.mlp, relevance)
    if attention_only:
        return None, r_attn
    r_qk, _ = logit_relprop(c, r_attn)  # the bias's share leaves the network
    r_q, r_kt = matmul_rule(c.qs, c.k.transpose(-2, -1), r_qk)
    return r_x + qkv_relprop(blk.attn, c.h1, r_q, r_kt.transpose(-2, -1), r_v), r_attn
