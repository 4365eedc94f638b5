"""LRP through a timm ViT: model checks, functional forward pass, relevance propagation.

The relevance propagation of Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
Visualization", CVPR 2021, through timm's VisionTransformer (and DeiT's distilled variant), with
the rules of :mod:`relreg.explain.lrp_rules` (LRP: Bach et al., PLoS ONE 2015). The patch
embedding, the head and the walk through the blocks (:func:`embed_forward`, :func:`head_forward`,
:func:`head_relprop`, :func:`embed_relprop`, :func:`propagate`) serve the other families too
(:mod:`relreg.explain.lrp_eva`, :mod:`relreg.explain.lrp_beit`); which family a model is decides
:mod:`relreg.explain.lrp_models`.

The model is run functionally from its own modules and weights (same layout as
:class:`timm.models.vision_transformer.VisionTransformer`, whose logits it reproduces) and is not
modified: no hooks, no flags, no mode changes. One forward pass serves the whole batch. What the
learned prefix tokens (CLS, distillation, registers) and the position embedding receive leaves the
network, so the pixel relevance sums to the start relevance minus their share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relreg.explain.capture import hierarchical_problem
from relreg.explain.lrp_mlp import MlpCache, mlp_relprop
from relreg.explain.lrp_rules import (
    add_rule,
    conv_zb,
    linear_alpha_beta,
    matmul_rule,
    safe_divide,
)

__all__ = [
    "BlockCache",
    "ViTForward",
    "Embedded",
    "check_vit_model",
    "embed_forward",
    "head_forward",
    "functional_forward",
    "head_relprop",
    "attention_relprop",
    "qkv_relprop",
    "block_relprop",
    "embed_relprop",
    "propagate",
]


# ------------------------------------------------------------------------------- model checks


def _same_method(obj: object, base: type, names: tuple[str, ...]) -> bool:
    return all(getattr(type(obj), n, None) is getattr(base, n) for n in names)


def check_vit_model(model: nn.Module) -> None:
    """Raise unless ``model`` is a timm ViT whose layers the LRP rules cover.

    Expected: a :class:`timm.models.vision_transformer.VisionTransformer` (or DeiT's distilled
    variant) whose ``blocks`` are timm ``Block`` s with timm ``Attention`` (no gate) and ``Mlp``,
    ``global_pool`` ``"token"`` or ``"avg"`` and a ``Linear`` head.

    Raises:
        TypeError: for a model or a layer of another kind.
        ValueError: for a hierarchical window model (Swin: :func:`hierarchical_problem`) or an
            unsupported configuration (pooling, head, training-time token drop).
    """
    hierarchical = hierarchical_problem(model)
    if hierarchical is not None:
        raise ValueError(f"Expected a ViT with one token sequence for LRP, but {hierarchical}.")
    _check_blocks(model)
    _check_vit_class(model)
    _check_patch_embed(model)
    _check_pooling(model)
    _check_heads(model)
    _check_no_training_behaviour(model)


def _check_blocks(model: nn.Module) -> None:
    from timm.models.vision_transformer import Block

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        raise TypeError(
            "Expected a timm VisionTransformer with a non-empty `blocks` sequence of timm Block "
            f"modules for LRP, but got {type(model).__name__} without one."
        )
    for i, blk in enumerate(blocks):
        if not isinstance(blk, Block) or not _same_method(blk, Block, ("forward",)):
            raise TypeError(
                f"Expected blocks[{i}] to be a timm Block (timm.models.vision_transformer.Block), "
                f"but got {type(blk).__name__}: the LRP rules cover only its layers."
            )
        _check_attention(i, blk.attn)
        _check_mlp(i, blk.mlp)
        _check_layer_scales(i, blk)


def _check_attention(i: int, attn: nn.Module) -> None:
    from timm.layers import Attention

    if (
        not isinstance(attn, Attention)
        or not _same_method(attn, Attention, ("forward",))
        or getattr(attn, "gate", None) is not None
        or not isinstance(attn.qkv, nn.Linear)
        or not isinstance(attn.proj, nn.Linear)
    ):
        raise TypeError(
            f"Expected blocks[{i}].attn to be timm's Attention (Linear qkv/proj, no gate), "
            f"but got {type(attn).__name__}."
        )


def _check_mlp(i: int, mlp: nn.Module) -> None:
    from timm.layers import Mlp

    if (
        not isinstance(mlp, Mlp)
        or not _same_method(mlp, Mlp, ("forward",))
        or not isinstance(mlp.fc1, nn.Linear)
        or not isinstance(mlp.fc2, nn.Linear)
    ):
        raise TypeError(
            f"Expected blocks[{i}].mlp to be timm's Mlp with Linear fc1/fc2, but got "
            f"{type(mlp).__name__}."
        )


def _check_layer_scales(i: int, blk: nn.Module) -> None:
    from timm.layers import LayerScale

    for ls_name in ("ls1", "ls2"):
        ls = getattr(blk, ls_name)
        if not isinstance(ls, nn.Identity | LayerScale):
            raise TypeError(
                f"Expected blocks[{i}].{ls_name} to be LayerScale or Identity, but got "
                f"{type(ls).__name__}."
            )


def _check_vit_class(model: nn.Module) -> None:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    overridden = ("forward", "forward_features", "forward_head", "_pos_embed", "pool")
    if not isinstance(model, VisionTransformer) or (
        type(model) is not VisionTransformerDistilled
        and not _same_method(model, VisionTransformer, overridden)
    ):
        raise TypeError(
            "Expected a timm VisionTransformer (timm.models.vision_transformer.VisionTransformer "
            f"or DeiT's VisionTransformerDistilled), but got {type(model).__name__}."
        )


def _check_patch_embed(model: nn.Module) -> None:
    from timm.layers import PatchEmbed

    embed = model.patch_embed
    if (
        not isinstance(embed, PatchEmbed)
        or not _same_method(embed, PatchEmbed, ("forward",))
        or not isinstance(embed.proj, nn.Conv2d)
        or embed.proj.padding_mode != "zeros"
        or not (embed.flatten or getattr(model, "dynamic_img_size", False))
    ):
        raise TypeError(
            "Expected patch_embed to be timm's PatchEmbed with a zero-padded Conv2d projection and "
            f"token output, but got {type(embed).__name__}."
        )


def _check_pooling(model: nn.Module) -> None:
    pool = model.global_pool
    if model.attn_pool is not None or pool not in ("token", "avg") or model.pool_include_prefix:
        raise ValueError(
            "Expected global_pool 'token' or 'avg' (patch tokens only) for LRP, but got "
            f"global_pool={pool!r}, attn_pool={type(model.attn_pool).__name__}, "
            f"pool_include_prefix={model.pool_include_prefix}{pooling_hint(model)}."
        )


def pooling_hint(model: nn.Module) -> str:
    """What the LRP rules lack for an attention-pool read-out (SigLIP, PE: ``global_pool="map"``),
    as the end of an error message; empty otherwise."""
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is None:
        return ""
    return (
        f": {type(model).__name__}'s attention pool ({type(attn_pool).__name__}, SigLIP / PE) "
        "has no LRP rule here (its latent query, its own attention and MLP)"
    )


def _check_heads(model: nn.Module) -> None:
    from timm.models.deit import VisionTransformerDistilled

    heads = [model.head]
    if isinstance(model, VisionTransformerDistilled):
        heads.append(model.head_dist)
    if not all(isinstance(h, nn.Linear) for h in heads):
        raise ValueError(
            "Expected a Linear classifier head (num_classes > 0) for LRP, but got "
            f"{', '.join(type(h).__name__ for h in heads)}."
        )


def _check_no_training_behaviour(model: nn.Module) -> None:
    """Raise for train-mode behaviour the propagation does not follow (two outputs, token drop)."""
    from timm.models.deit import VisionTransformerDistilled

    if (
        isinstance(model, VisionTransformerDistilled)
        and model.distilled_training
        and model.training
    ):
        raise ValueError(
            "Expected the distilled model to return one logits tensor, but distilled_training is "
            "on in train mode (it returns two)."
        )
    if not isinstance(model.patch_drop, nn.Identity) and model.patch_drop.training:
        if getattr(model.patch_drop, "prob", 0.0) > 0:
            raise ValueError(
                "Expected no patch dropout during the explanation, but patch_drop is active in "
                "train mode: call model.eval() first."
            )


# --------------------------------------------------------------------------- functional forward


@dataclass
class BlockCache:
    """Activations of one block that the rules need (all ``(B, N, D)`` unless noted).

    Attributes:
        x: block input (skip operand of the first residual).
        h1: norm1 output = qkv input.
        qs: scaled queries ``(B, h, N, d)``.
        k: keys ``(B, h, N, d)``.
        v: values ``(B, h, N, d)``.
        attn: softmax output ``(B, h, N, N)``, the tensor the gradients are taken of.
        attn_drop: attn_drop output, the operand of ``attn @ v`` ``(B, h, N, N)``.
        o: proj input ``(B, N, A)``.
        u1: attention branch at the residual.
        x1: after the first residual.
        h2: norm2 output = fc1 input.
        g: fc2 input ``(B, N, hidden)``.
        u2: MLP branch at the residual.
    """

    x: Tensor
    h1: Tensor
    qs: Tensor
    k: Tensor
    v: Tensor
    attn: Tensor
    attn_drop: Tensor
    o: Tensor
    u1: Tensor
    x1: Tensor
    h2: Tensor
    g: Tensor
    u2: Tensor


@dataclass
class ViTForward:
    """Everything the backward rules need from one functional forward pass.

    Attributes:
        pixels: conv input ``(B, C, H', W')`` (padded if ``dynamic_img_pad``).
        grid: conv output grid ``(gh, gw)``.
        patches: patch tokens before the position embedding ``(B, P, D)``.
        pos: position embedding as added ``(1, P or N, D)``.
        pos_on_prefix: True: ``pos`` added after concatenating the prefix tokens.
        blocks: the activations of every block.
        tokens: final-norm output ``(B, N, D)``.
        head_inputs: ``(B, D)`` input(s) of head (and head_dist).
        head_outputs: ``(B, K)`` output(s) of head (and head_dist).
        logits: ``(B, K)``.
    """

    pixels: Tensor
    grid: tuple[int, int]
    patches: Tensor
    pos: Tensor | None
    pos_on_prefix: bool
    blocks: list[BlockCache]
    tokens: Tensor
    head_inputs: list[Tensor]
    head_outputs: list[Tensor]
    logits: Tensor


def _layer_scale(ls: nn.Module, x: Tensor) -> Tensor:
    return x if isinstance(ls, nn.Identity) else x * ls.gamma


def _block_forward(blk: nn.Module, x: Tensor) -> tuple[Tensor, BlockCache]:
    attn = blk.attn
    mlp = blk.mlp
    b, n, _ = x.shape
    heads = attn.num_heads
    head_dim = attn.head_dim
    h1 = blk.norm1(x)
    qkv = attn.qkv(h1).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = attn.q_norm(q)
    k = attn.k_norm(k)
    qs = q * attn.scale
    a = (qs @ k.transpose(-2, -1)).softmax(dim=-1)
    ad = attn.attn_drop(a)
    o = attn.norm((ad @ v).transpose(1, 2).reshape(b, n, heads * head_dim))
    u1 = blk.drop_path1(_layer_scale(blk.ls1, attn.proj_drop(attn.proj(o))))
    x1 = x + u1
    h2 = blk.norm2(x1)
    g = mlp.norm(mlp.drop1(mlp.act(mlp.fc1(h2))))
    u2 = blk.drop_path2(_layer_scale(blk.ls2, mlp.drop2(mlp.fc2(g))))
    return x1 + u2, BlockCache(x, h1, qs, k, v, a, ad, o, u1, x1, h2, g, u2)


def _prefix_tokens(model: nn.Module, batch: int) -> list[Tensor]:
    names = (
        ("cls_token", "dist_token") if hasattr(model, "head_dist") else ("cls_token", "reg_token")
    )
    out = []
    for attr in names:
        t = getattr(model, attr, None)
        if t is not None:
            out.append(t.expand(batch, -1, -1))
    return out


@dataclass
class Embedded:
    """The token sequence before the first block and what the embedding rules need.

    Attributes:
        pixels: conv input ``(B, C, H', W')`` (padded if ``dynamic_img_pad``).
        grid: conv output grid ``(gh, gw)``.
        patches: patch tokens before the position embedding ``(B, P, D)``.
        pos: position embedding as added ``(1, P or N, D)``, or None.
        pos_on_prefix: True: ``pos`` added after concatenating the prefix tokens.
        tokens: prefix and patch tokens with the position embedding ``(B, N, D)``, before any
            dropout or pre-norm.
    """

    pixels: Tensor
    grid: tuple[int, int]
    patches: Tensor
    pos: Tensor | None
    pos_on_prefix: bool
    tokens: Tensor


def embed_forward(model: nn.Module, images: Tensor) -> Embedded:
    """Patch embedding, prefix tokens and absolute position embedding of a timm ViT-like model.

    The layout of timm's ``VisionTransformer``, ``Eva`` and ``Beit``: a ``PatchEmbed``
    convolution, the ``cls_token`` (DeiT: and ``dist_token``; else ``reg_token``) before the patch
    tokens, ``pos_embed`` added after (``no_embed_class``: before) the concatenation and resampled
    to the grid when ``dynamic_img_size``.

    Args:
        model: the model (checked by its family's check).
        images: ``(B, C, H, W)``.
    """
    embed = model.patch_embed
    x = images
    if embed.dynamic_img_pad:
        ph, pw = embed.patch_size
        x = F.pad(x, (0, (ph - x.shape[-2] % ph) % ph, 0, (pw - x.shape[-1] % pw) % pw))
    conv = embed.proj(x)
    grid = (conv.shape[-2], conv.shape[-1])
    patches = embed.norm(conv.flatten(2).transpose(1, 2))
    prefix = _prefix_tokens(model, x.shape[0])
    n_prefix = sum(t.shape[1] for t in prefix)
    pos = model.pos_embed
    no_embed_class = getattr(model, "no_embed_class", False)
    if pos is not None and getattr(model, "dynamic_img_size", False):
        from timm.layers import resample_abs_pos_embed

        pos = resample_abs_pos_embed(
            pos,
            new_size=grid,
            old_size=embed.grid_size,
            num_prefix_tokens=0 if no_embed_class else n_prefix,
        )
    if pos is None:
        tokens = torch.cat([*prefix, patches], dim=1)
    elif no_embed_class:
        tokens = torch.cat([*prefix, patches + pos], dim=1)
    else:
        tokens = torch.cat([*prefix, patches], dim=1) + pos
    return Embedded(x, grid, patches, pos, not no_embed_class, tokens)


def head_forward(model: nn.Module, tokens: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The read-out and the head(s) on the final-norm output ``tokens`` ``(B, N, D)``.

    Returns:
        The head inputs ``[(B, D)]``, the head outputs ``[(B, K)]`` (DeiT distilled: two of each)
        and the logits ``(B, K)``.
    """
    if hasattr(model, "head_dist"):
        inputs = [model.head_drop(tokens[:, 0]), model.head_drop(tokens[:, 1])]
        outputs = [model.head(inputs[0]), model.head_dist(inputs[1])]
        return inputs, outputs, (outputs[0] + outputs[1]) / 2
    if model.global_pool == "token":
        pooled = tokens[:, 0]
    else:
        pooled = tokens[:, model.num_prefix_tokens :].mean(dim=1)
    inputs = [model.head_drop(model.fc_norm(pooled))]
    outputs = [model.head(inputs[0])]
    return inputs, outputs, outputs[0]


def functional_forward(model: nn.Module, images: Tensor) -> ViTForward:
    """Run ``model`` (checked by :func:`check_vit_model`) layer by layer, keeping what LRP needs.

    Its ``logits`` equal ``model(images)`` (up to the unfused attention's rounding).
    """
    e = embed_forward(model, images)
    tokens = model.norm_pre(model.patch_drop(model.pos_drop(e.tokens)))
    caches = []
    for blk in model.blocks:
        tokens, cache = _block_forward(blk, tokens)
        caches.append(cache)
    tokens = model.norm(tokens)
    inputs, outputs, logits = head_forward(model, tokens)
    return ViTForward(
        e.pixels, e.grid, e.patches, e.pos, e.pos_on_prefix, caches, tokens, inputs, outputs, logits
    )


# ------------------------------------------------------------------------ relevance propagation


def head_relprop(model: nn.Module, fwd: ViTForward, relevance: Tensor) -> Tensor:
    """Relevance of the logits ``(B, K)`` -> relevance of the final tokens ``(B, N, D)``."""
    out = torch.zeros_like(fwd.tokens)
    if hasattr(model, "head_dist"):
        halves = [o / 2 for o in fwd.head_outputs]
        r_cls, r_dist = add_rule(halves[0], halves[1], relevance)
        out[:, 0] = linear_alpha_beta(fwd.head_inputs[0], model.head.weight, r_cls)
        out[:, 1] = linear_alpha_beta(fwd.head_inputs[1], model.head_dist.weight, r_dist)
        return out
    r_pooled = linear_alpha_beta(fwd.head_inputs[0], model.head.weight, relevance)
    if model.global_pool == "token":
        out[:, 0] = r_pooled
    else:
        prefix = model.num_prefix_tokens
        patches = fwd.tokens[:, prefix:]
        pooled = patches.mean(dim=1, keepdim=True)
        out[:, prefix:] = patches / patches.shape[1] * safe_divide(r_pooled[:, None], pooled)
    return out


def attention_relprop(
    blk: nn.Module, cache: BlockCache, mlp: MlpCache, relevance: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Relevance of a pre-norm block's output down to its attention probabilities: the second
    residual, the MLP (:func:`relreg.explain.lrp_mlp.mlp_relprop`), the first residual, ``proj``
    and ``attn @ v``. The part every family shares (ViT, EVA, BEiT); the layer scales, drop
    paths, dropouts and ``attn.norm`` are identity.

    Args:
        blk: the block (``attn.proj`` and ``mlp`` are read).
        cache: its activations (``x``, ``u1``, ``x1``, ``u2``, ``o``, ``attn_drop``, ``v``).
        mlp: the MLP's activations.
        relevance: relevance of the block's output ``(B, N, D)``.

    Returns:
        The skip share of the block input's relevance ``(B, N, D)``, the relevance of the
        attention probabilities ``(B, h, N, N)`` and of the values ``(B, h, N, d)``.
    """
    c = cache
    b, heads, n, head_dim = c.v.shape
    r_x1, r_u2 = add_rule(c.x1, c.u2, relevance)
    r_x1 = r_x1 + mlp_relprop(blk.mlp, mlp, r_u2)  # fork: relevances summed
    r_x, r_u1 = add_rule(c.x, c.u1, r_x1)
    r_o = linear_alpha_beta(c.o, blk.attn.proj.weight, r_u1)
    r_o = r_o.reshape(b, n, heads, head_dim).transpose(1, 2)
    r_attn, r_v = matmul_rule(c.attn_drop, c.v, r_o)
    return r_x, r_attn, r_v


def qkv_relprop(attn: nn.Module, h1: Tensor, r_q: Tensor, r_k: Tensor, r_v: Tensor) -> Tensor:
    """Relevances of q, k, v ``(B, h, N, d)`` -> of the attention input ``(B, N, D)``, by
    alpha1-beta0 through the fused ``qkv`` projection or, where the model splits it (EVA's
    ``q_proj``, ``k_proj``, ``v_proj``), through each of the three, their relevances summed (a
    fork: all three read the same tokens)."""
    b, heads, n, d = r_q.shape
    if getattr(attn, "qkv", None) is not None:
        r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(b, n, 3 * heads * d)
        return linear_alpha_beta(h1, attn.qkv.weight, r_qkv)
    parts = zip((attn.q_proj, attn.k_proj, attn.v_proj), (r_q, r_k, r_v), strict=True)
    return sum(
        linear_alpha_beta(h1, p.weight, r.transpose(1, 2).reshape(b, n, heads * d))
        for p, r in parts
    )


def block_relprop(
    blk: nn.Module, cache: BlockCache, relevance: Tensor, attention_only: bool = False
) -> tuple[Tensor | None, Tensor]:
    """Relevance through one block.

    Args:
        blk: the timm ``Block``.
        cache: its activations from :func:`functional_forward`.
        relevance: relevance of the block's output ``(B, N, D)``.
        attention_only: stop at the attention probabilities (the input relevance is then None).

    Returns:
        Relevance of the block's input ``(B, N, D)`` and of its attention probabilities
        ``(B, h, N, N)`` (what arrives at the softmax output).
    """
    c = cache
    r_x, r_attn, r_v = attention_relprop(blk, c, MlpCache(c.h2, c.g), relevance)
    if attention_only:
        return None, r_attn
    r_q, r_kt = matmul_rule(c.qs, c.k.transpose(-2, -1), r_attn)
    return r_x + qkv_relprop(blk.attn, c.h1, r_q, r_kt.transpose(-2, -1), r_v), r_attn


def embed_relprop(model: nn.Module, fwd: ViTForward, relevance: Tensor) -> Tensor:
    """Relevance of the first block's input ``(B, N, D)`` -> relevance of the convolution's input
    ``(B, C, H', W')`` (the images, padded when ``dynamic_img_pad``); what the learned prefix
    tokens and the position embedding take is the difference of the two sums."""
    n_prefix = relevance.shape[1] - fwd.patches.shape[1]
    if fwd.pos is None:
        r_patches = relevance[:, n_prefix:]
    elif fwd.pos_on_prefix:
        r_tokens, _ = add_rule(_prefix_values(model, fwd), fwd.pos, relevance)
        r_patches = r_tokens[:, n_prefix:]
    else:
        r_patches, _ = add_rule(fwd.patches, fwd.pos, relevance[:, n_prefix:])
    b, _, d = r_patches.shape
    r_conv = r_patches.transpose(1, 2).reshape(b, d, *fwd.grid)
    return conv_zb(fwd.pixels, model.patch_embed.proj, r_conv)


def _prefix_values(model: nn.Module, fwd: ViTForward) -> Tensor:
    """The concatenated tokens before the position embedding is added ``(B, N, D)``."""
    return torch.cat([*_prefix_tokens(model, fwd.patches.shape[0]), fwd.patches], dim=1)


def propagate(
    model: nn.Module,
    fwd: ViTForward,
    relevance: Tensor,
    down_to: int = 0,
    pixels: bool = False,
    relprops: tuple[Callable, Callable, Callable] | None = None,
) -> tuple[dict[int, Tensor], Tensor | None]:
    """Propagate the logits' relevance ``(B, K)`` down to block ``down_to`` (or to the pixels).

    Args:
        relprops: another rule set's ``(head_relprop, block_relprop, embed_relprop)`` (default:
            this module's; :mod:`relreg.explain.lrp_baseline` passes the CVPR 2021 baseline's).

    Returns:
        ``{block index: attention relevance (B, h, N, N)}`` for blocks ``>= down_to`` and, when
        ``pixels``, the pixel relevance ``(B, C, H', W')``.
    """
    head, block, embed = relprops or (head_relprop, block_relprop, embed_relprop)
    with torch.no_grad():
        r = head(model, fwd, relevance)
        attention: dict[int, Tensor] = {}
        for i in range(len(fwd.blocks) - 1, down_to - 1, -1):
            # the last block needed stops at its attention unless the pixels are asked for
            stop = i == down_to and not pixels
            r, attention[i] = block(model.blocks[i], fwd.blocks[i], r, stop)
        if not pixels:
            return attention, None
        assert r is not None
        return attention, embed(model, fwd, r)
