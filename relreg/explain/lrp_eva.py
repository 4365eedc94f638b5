"""LRP through timm's ``Eva`` models: EVA / EVA-02, RoPE-ViT, DINOv3 (rotary position embedding).

The relevance propagation of Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
Visualization", CVPR 2021 (LRP: Bach, Binder, Montavon, Klauschen, Mueller & Samek, PLoS ONE
2015) with the rules of :mod:`relreg.explain.lrp_rules`, through :class:`timm.models.eva.Eva`
with pre-norm ``EvaBlock`` s whose attention is ``EvaAttention`` or ``AttentionRope``. What these
blocks add to a ViT block, and the rule at each:

- Rotary position embedding: a fixed (input-independent) rotation ``R_n`` of the queries and keys
  of each patch position ``n`` (after the q/k norms; the prefix tokens are left unrotated).
  :func:`relreg.explain.lrp_rules.rotation_rule`: gradient x input (LRP-0) with the weight
  ``R_n``, which :func:`rotation_matrices` builds by applying timm's own rotation
  (``apply_rot_embed_cat``, the interleaved or rotate-half layout the attention uses) to the
  identity basis. The unrotated prefix tokens pass unchanged. RoPE-Mixed's per-block, per-head
  rotations alike.
- SwiGLU / GLU MLPs (EVA-02) and the sub-norm of ``scale_mlp``: :mod:`relreg.explain.lrp_mlp`.
- ``gamma_1`` / ``gamma_2`` (layer scale), the attention's inner ``norm`` (``scale_attn_inner``),
  the q/k norms: identity. EVA's separate ``q_bias`` / ``v_bias`` (and every other bias) take no
  relevance, as in a ViT block.

The patch embedding, prefix tokens, absolute position embedding (when the model has one), the
read-out and the head are those of :mod:`relreg.explain.lrp_vit`, whose :func:`head_relprop`,
:func:`embed_relprop` and :func:`propagate` run the walk. Refused (with an error naming what is
missing): post-norm blocks, gated attention, grouped-query attention, attention pooling
(``global_pool="map"``), max pooling, and patch dropout in train mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relreg.explain.lrp_mlp import MlpCache, check_mlp, mlp_forward
from relreg.explain.lrp_rules import matmul_rule, rotation_rule
from relreg.explain.lrp_vit import (
    BlockCache,
    ViTForward,
    _check_heads,
    _check_patch_embed,
    _same_method,
    attention_relprop,
    embed_forward,
    head_forward,
    pooling_hint,
    qkv_relprop,
)

__all__ = [
    "EvaBlockCache",
    "check_eva_model",
    "rotation_matrices",
    "functional_forward",
    "block_relprop",
]


# ------------------------------------------------------------------------------- model checks


def check_eva_model(model: nn.Module) -> None:
    """Raise unless ``model`` is a timm ``Eva`` whose layers the LRP rules cover.

    Expected: :class:`timm.models.eva.Eva` with pre-norm ``EvaBlock`` s (``EvaAttention`` or
    ``AttentionRope`` without a gate or grouped k/v heads; ``Mlp``, ``GluMlp`` or ``SwiGLU``),
    timm's ``PatchEmbed``, ``global_pool`` ``"token"`` or ``"avg"`` and a ``Linear`` head.

    Raises:
        TypeError: for a model or a layer of another kind.
        ValueError: for an unsupported configuration (pooling, head, training-time token drop).
    """
    from timm.models.eva import Eva

    methods = ("forward", "forward_features", "forward_head", "_pos_embed", "pool")
    if not isinstance(model, Eva) or not _same_method(model, Eva, methods):
        raise TypeError(
            f"Expected a timm Eva (timm.models.eva.Eva), but got {type(model).__name__}."
        )
    _check_blocks(model)
    _check_patch_embed(model)
    if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
        raise ValueError(
            "Expected global_pool 'token' or 'avg' (patch tokens only) for LRP, but got "
            f"global_pool={model.global_pool!r}, attn_pool={type(model.attn_pool).__name__}"
            f"{pooling_hint(model)}."
        )
    _check_heads(model)
    drop = model.patch_drop
    if drop is not None and drop.training and getattr(drop, "prob", 0.0) > 0:
        raise ValueError(
            "Expected no patch dropout during the explanation, but patch_drop is active in train "
            "mode: call model.eval() first."
        )


def _check_blocks(model: nn.Module) -> None:
    from timm.models.eva import EvaBlock

    blocks = model.blocks
    if len(blocks) == 0:
        raise TypeError("Expected an Eva with a non-empty `blocks` sequence, but got none.")
    for i, blk in enumerate(blocks):
        if not isinstance(blk, EvaBlock) or not _same_method(blk, EvaBlock, ("forward",)):
            raise TypeError(
                f"Expected blocks[{i}] to be timm's pre-norm EvaBlock (timm.models.eva.EvaBlock), "
                f"but got {type(blk).__name__}: the LRP rules cover only its layers (post-norm "
                "blocks normalise the residual branch after the attention)."
            )
        _check_attention(i, blk.attn, model.num_prefix_tokens)
        check_mlp(f"blocks[{i}].mlp", blk.mlp)


def _check_attention(i: int, attn: nn.Module, num_prefix_tokens: int) -> None:
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention

    cls = EvaAttention if isinstance(attn, EvaAttention) else AttentionRope
    if not isinstance(attn, cls) or not _same_method(attn, cls, ("forward",)):
        linears = False
    elif attn.qkv is not None:
        linears = isinstance(attn.qkv, nn.Linear) and isinstance(attn.proj, nn.Linear)
    else:
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.proj)
        linears = all(isinstance(p, nn.Linear) for p in projections)
    if not linears:
        raise TypeError(
            f"Expected blocks[{i}].attn to be timm's EvaAttention or AttentionRope with Linear "
            f"projections, but got {type(attn).__name__}."
        )
    if attn.gate is not None or getattr(attn, "num_kv_groups", 1) != 1:
        raise ValueError(
            f"Expected blocks[{i}].attn without an output gate and with one k/v head per query "
            f"head for LRP, but got gate={type(attn.gate).__name__}, "
            f"num_kv_groups={getattr(attn, 'num_kv_groups', 1)}: the LRP rules cover neither."
        )
    if attn.num_prefix_tokens != num_prefix_tokens:
        raise ValueError(
            f"Expected blocks[{i}].attn to leave the model's {num_prefix_tokens} prefix tokens "
            f"unrotated, but it leaves {attn.num_prefix_tokens}."
        )


# --------------------------------------------------------------------------- functional forward


@dataclass
class EvaBlockCache(BlockCache):
    """A :class:`relreg.explain.lrp_vit.BlockCache` (``qs``, ``k``: the rotated queries, scaled,
    and keys) with what the rotation and the MLP rules need.

    Attributes:
        q_in: the queries before the rotation (after ``q_norm``) ``(B, h, N, d)``.
        k_in: the keys before the rotation (after ``k_norm``) ``(B, h, N, d)``.
        rope: the block's sin/cos embedding ``(..., P, 2 d)`` as the attention took it, or None.
        rotate_half: True: the rotate-half layout, else interleaved.
        n_unrotated: the leading tokens left unrotated (the prefix tokens).
        mlp: the MLP's activations.
    """

    q_in: Tensor
    k_in: Tensor
    rope: Tensor | None
    rotate_half: bool
    n_unrotated: int
    mlp: MlpCache


def _rope_embed(model: nn.Module, grid: tuple[int, int]) -> Tensor | None:
    """The sin/cos embedding ``Eva._pos_embed`` hands the blocks, for the patch grid ``grid``."""
    rope = model.rope
    if rope is None:
        return None
    if model.dynamic_img_size:
        return rope.get_embed(shape=grid)
    if hasattr(rope, "feat_shape"):
        return rope.get_embed()
    return rope.get_embed(shape=model.patch_embed.grid_size)


def _rotate(x: Tensor, rope: Tensor | None, n_unrotated: int, rotate_half: bool) -> Tensor:
    """timm's rotation of queries or keys ``(B, h, N, d)``: patch tokens rotated, prefix kept."""
    if rope is None:
        return x
    from timm.layers import apply_rot_embed_cat

    rotated = apply_rot_embed_cat(x[:, :, n_unrotated:], rope, half=rotate_half)
    return torch.cat([x[:, :, :n_unrotated], rotated], dim=2)


def rotation_matrices(rope: Tensor, head_dim: int, rotate_half: bool, dtype: torch.dtype) -> Tensor:
    """The rotation ``R_n`` of every rotated position as ``(out, in)`` matrices ``(..., P, d, d)``.

    timm's ``apply_rot_embed_cat`` applied to the identity basis ``e_1 .. e_d`` at each position:
    its output for ``e_i`` is the column ``R_n e_i``, so the layout (interleaved or rotate-half) is
    the model's own.

    Args:
        rope: the sin/cos embedding ``(..., P, 2 d)`` (``(P, 2 d)``; RoPE-Mixed: ``(h, P, 2 d)``).
        head_dim: ``d``.
        rotate_half: the attention's layout flag.
        dtype: the queries' dtype (the rotation's output dtype in timm).
    """
    from timm.layers import apply_rot_embed_cat

    basis = torch.eye(head_dim, dtype=dtype, device=rope.device)  # row i: e_i
    columns = apply_rot_embed_cat(basis, rope.unsqueeze(-2), half=rotate_half)  # (..., P, i, j)
    return columns.transpose(-2, -1)


def _qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values ``(B, h, N, d)`` as the attention computes them."""
    b, n, _ = x.shape
    heads = attn.num_heads
    if attn.qkv is None:
        q, k, v = (
            p(x).reshape(b, n, heads, -1).transpose(1, 2)
            for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        return q, k, v
    q_bias = getattr(attn, "q_bias", None)  # EvaAttention's separate biases; k's is zero
    if q_bias is None:
        qkv = attn.qkv(x)
    else:
        bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
    q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _block_forward(blk: nn.Module, x: Tensor, rope: Tensor | None) -> tuple[Tensor, EvaBlockCache]:
    attn = blk.attn
    b, n, _ = x.shape
    h1 = blk.norm1(x)
    q, k, v = _qkv(attn, h1)
    q_in, k_in = attn.q_norm(q), attn.k_norm(k)
    half = bool(getattr(attn, "rotate_half", False))
    npt = attn.num_prefix_tokens
    q_rot = _rotate(q_in, rope, npt, half).type_as(v)
    k_rot = _rotate(k_in, rope, npt, half).type_as(v)
    qs = q_rot * attn.scale
    a = (qs @ k_rot.transpose(-2, -1)).softmax(dim=-1)
    ad = attn.attn_drop(a)
    o = attn.norm((ad @ v).transpose(1, 2).reshape(b, n, -1))
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
    cache = EvaBlockCache(
        x, h1, qs, k_rot, v, a, ad, o, u1, x1, h2, mlp.g, u2, q_in, k_in, rope, half, npt, mlp
    )
    return x1 + u2, cache


def functional_forward(model: nn.Module, images: Tensor) -> ViTForward:
    """Run ``model`` (checked by :func:`check_eva_model`) layer by layer, keeping what LRP needs.

    Its ``logits`` equal ``model(images)`` (up to the unfused attention's rounding); its
    ``blocks`` are :class:`EvaBlockCache` s.
    """
    e = embed_forward(model, images)
    tokens = model.pos_drop(e.tokens)
    if model.patch_drop is not None:
        tokens, _ = model.patch_drop(tokens)  # identity in eval mode (checked)
    tokens = model.norm_pre(tokens)
    rope = _rope_embed(model, e.grid)
    caches = []
    for i, blk in enumerate(model.blocks):
        block_rope = rope[i] if rope is not None and model.rope_mixed else rope
        tokens, cache = _block_forward(blk, tokens, block_rope)
        caches.append(cache)
    tokens = model.norm(tokens)
    inputs, outputs, logits = head_forward(model, tokens)
    return ViTForward(
        e.pixels, e.grid, e.patches, e.pos, e.pos_on_prefix, caches, tokens, inputs, outputs, logits
    )


# ------------------------------------------------------------------------ relevance propagation


def _unrotate(relevance: Tensor, x: Tensor, c: EvaBlockCache) -> Tensor:
    """Relevance of rotated queries or keys ``(B, h, N, d)`` -> of ``x``, the same before the
    rotation: :func:`rotation_rule` on the rotated tokens, the prefix tokens unchanged."""
    if c.rope is None:
        return relevance
    p = c.n_unrotated
    rotation = rotation_matrices(c.rope, x.shape[-1], c.rotate_half, x.dtype)
    rotated = rotation_rule(x[:, :, p:], rotation, relevance[:, :, p:])
    return torch.cat([relevance[:, :, :p], rotated], dim=2)


def block_relprop(
    blk: nn.Module, cache: EvaBlockCache, relevance: Tensor, attention_only: bool = False
) -> tuple[Tensor | None, Tensor]:
    """Relevance through one ``EvaBlock``.

    Args:
        blk: the block.
        cache: its activations from :func:`functional_forward`.
        relevance: relevance of the block's output ``(B, N, D)``.
        attention_only: stop at the attention probabilities (the input relevance is then None).

    Returns:
        Relevance of the block's input ``(B, N, D)`` and of its attention probabilities
        ``(B, h, N, N)`` (what arrives at the softmax output).
    """
    c = cache
    r_x, r_attn, r_v = attention_relprop(blk, c, c.mlp, relevance)
    if attention_only:
        return None, r_attn
    r_q, r_kt = matmul_rule(c.qs, c.k.transpose(-2, -1), r_attn)
    r_q = _unrotate(r_q, c.q_in, c)
    r_k = _unrotate(r_kt.transpose(-2, -1), c.k_in, c)
    return r_x + qkv_relprop(blk.attn, c.h1, r_q, r_k, r_v), r_attn
