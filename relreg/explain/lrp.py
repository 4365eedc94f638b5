"""Layer-wise relevance propagation (LRP) for timm ViTs: full LRP, partial LRP, transformer attribution.

- ``lrp``: Bach, Binder, Montavon, Klauschen, Mueller & Samek, "On Pixel-Wise Explanations for
  Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation", PLoS ONE 2015, with the
  transformer rules of Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
  Visualization", CVPR 2021: relevance of the input pixels, summed over colour channels,
  ``(B, H, W)``.
- ``partial_lrp``: Voita, Talbot, Moiseev, Sennrich & Titov, "Analyzing Multi-Head
  Self-Attention", ACL 2019, as evaluated by Chefer et al., CVPR 2021: the LRP relevance of the
  last block's attention probabilities, positive part, head mean, read-out row, ``(B, gh, gw)``.
- ``transformer_attribution``: Chefer, Gur & Wolf, CVPR 2021: per block
  ``Abar_b = mean_h (dy/dA_b * R_b)^+`` with ``R_b`` the LRP relevance of the attention
  probabilities ``A_b``; rollout ``prod_b (I + Abar_b)`` from ``start_layer``; read-out row over
  the patch tokens, ``(B, gh, gw)``.

Propagation rules (CVPR 2021), written here from the rules, not from any released code:

- ``Linear`` layers (``qkv``, ``proj``, ``fc1``, ``fc2``, the heads): LRP-alpha-beta with
  ``alpha = 1, beta = 0``: ``R_i = sum_j (x_i^+ w_ij^+ + x_i^- w_ij^-) / z_j^+ R_j`` with
  ``z_j^+ = sum_i (x_i^+ w_ij^+ + x_i^- w_ij^-)``; biases take no relevance. It conserves
  ``sum_i R_i = sum_j R_j`` wherever ``z_j^+ > 0``.
- The patch-embedding convolution (the input layer): the ``z^B`` (bounded) rule with the lowest
  and highest input value ``l, h``, taken per image as the image's own minimum and maximum (the
  convention of the paper's code): ``R_i = sum_j (x_i w_ij - l w_ij^+ - h w_ij^-) / z_j R_j``.
- LayerNorm / RmsNorm, GELU, softmax, dropout, DropPath, LayerScale, the attention scale and the
  q/k norms: identity (the relevance passes unchanged).
- The two matrix products of attention (``q k^T`` and ``A v``): gradient x input for each operand,
  ``R_x = x * d z / d x . (R / z)``, then each operand's relevance halved, which conserves the total.
- Additions (the two residuals per block, the position embedding, DeiT's head average):
  gradient x input for each operand, then each part rescaled so that its sum is
  ``sum(R) * |sum R_a| / (|sum R_a| + |sum R_b|)``, which conserves the total.
- The fork before each residual (the skip and the branch read the same tokens): relevances summed.
- Token read-out (``global_pool="token"``): the CLS token gets the head's relevance (DeiT: the
  CLS and distillation tokens through ``head`` / ``head_dist``, whose average is an addition);
  average pooling (``"avg"``) spreads it over the pooled tokens by gradient x input.

Contrast (``foil``): the start ``one_hot(target) - one_hot(foil)`` sums to 0, which the normalised
addition rule turns into 0 everywhere, so the target's and the foil's relevances are propagated
separately (from their one-hot starts) and subtracted; ``transformer_attribution`` weights that
difference with the gradient of ``y_target - y_foil``.

Every sum of a normalisation is taken per sample, so a batched call equals one call per image.
Divisions are ``eps``-stabilised and give 0 where the denominator is 0. What the learned prefix
tokens (CLS, distillation, registers) and the position embedding receive leaves the network, so
``lrp``'s pixel map sums to the start relevance minus their share (1 minus it for one-hot starts).

The model is run functionally from its own modules and weights (same layout as
:class:`timm.models.vision_transformer.VisionTransformer`, whose logits it reproduces) and is not
modified: no hooks, no flags, no mode changes. One forward pass serves the whole batch; one
backward pass (to the attention maps only) adds the gradients of ``transformer_attribution``.
These maps are not differentiable (``differentiable=True`` raises).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relreg.explain.attention import _check_start_layer, _to_grid
from relreg.explain.inputs import (
    Explanation,
    TargetLike,
    check_grad_mode,
    check_images,
    finish,
    resolve_classes,
    score,
)
from relreg.explain.registry import register_explainer
from relreg.explain.tokens import readout_weights

__all__ = ["lrp", "partial_lrp", "transformer_attribution"]

EPS = 1e-9


# --------------------------------------------------------------------------------------- rules


def safe_divide(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """``a / b`` with ``b`` pushed ``eps`` away from 0 (keeping its sign); 0 where ``b == 0``."""
    den = b + torch.where(b >= 0, eps, -eps)
    return torch.where(b == 0, torch.zeros_like(a * b), a / den)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` broadcasting against ``like``."""
    return v.view(-1, *([1] * (like.ndim - 1)))


def _total(r: Tensor) -> Tensor:
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
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
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
    wp, wn = w.clamp(min=0), w.clamp(max=0)
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


def matmul_rule(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient x input through ``z = a @ b``, each operand's relevance halved.

    Args:
        a: ``(..., n, k)``.
        b: ``(..., k, m)``.
        relevance: relevance of ``z`` ``(..., n, m)``.

    Returns:
        Relevances of ``a`` and ``b`` (same shapes); each sums to half of ``relevance``.
    """
    s = safe_divide(relevance, a @ b)
    ra = a * (s @ b.transpose(-2, -1))
    rb = b * (a.transpose(-2, -1) @ s)
    return ra / 2, rb / 2


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
    a, b = a.expand_as(relevance), b.expand_as(relevance)
    s = safe_divide(relevance, a + b)
    ra, rb = a * s, b * s
    sa, sb, total = _total(ra), _total(rb), _total(relevance)
    share = sa.abs() + sb.abs()
    fa = safe_divide(sa.abs(), share) * total
    fb = safe_divide(sb.abs(), share) * total
    ra = ra * _per_sample(safe_divide(fa, sa), ra)
    rb = rb * _per_sample(safe_divide(fb, sb), rb)
    return ra, rb


# ------------------------------------------------------------------------------- model checks


def _vit_classes() -> tuple[type, ...]:
    from timm.layers import Attention, LayerScale, Mlp, PatchEmbed
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    return (
        VisionTransformer,
        VisionTransformerDistilled,
        Block,
        Attention,
        Mlp,
        PatchEmbed,
        LayerScale,
    )


def _same_method(obj: object, base: type, names: tuple[str, ...]) -> bool:
    return all(getattr(type(obj), n, None) is getattr(base, n) for n in names)


def check_lrp_model(model: nn.Module) -> None:
    """Raise unless ``model`` is a timm ViT whose layers the LRP rules cover.

    Expected: a :class:`timm.models.vision_transformer.VisionTransformer` (or DeiT's distilled
    variant) whose ``blocks`` are timm ``Block`` s with timm ``Attention`` (no gate) and ``Mlp``,
    ``global_pool`` ``"token"`` or ``"avg"`` and a ``Linear`` head.

    Raises:
        TypeError: for a model or a layer of another kind.
        ValueError: for an unsupported configuration (pooling, head, training-time token drop).
    """
    vit_cls, distilled_cls, block_cls, attn_cls, mlp_cls, embed_cls, ls_cls = _vit_classes()
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        raise TypeError(
            "Expected a timm VisionTransformer with a non-empty `blocks` sequence of timm Block "
            f"modules for LRP, but got {name} without one."
        )
    for i, blk in enumerate(blocks):
        if not isinstance(blk, block_cls) or not _same_method(blk, block_cls, ("forward",)):
            raise TypeError(
                f"Expected blocks[{i}] to be a timm Block (timm.models.vision_transformer.Block), "
                f"but got {type(blk).__name__}: the LRP rules cover only its layers."
            )
        attn, mlp = blk.attn, blk.mlp
        if (
            not isinstance(attn, attn_cls)
            or not _same_method(attn, attn_cls, ("forward",))
            or getattr(attn, "gate", None) is not None
            or not isinstance(attn.qkv, nn.Linear)
            or not isinstance(attn.proj, nn.Linear)
        ):
            raise TypeError(
                f"Expected blocks[{i}].attn to be timm's Attention (Linear qkv/proj, no gate), "
                f"but got {type(attn).__name__}."
            )
        if (
            not isinstance(mlp, mlp_cls)
            or not _same_method(mlp, mlp_cls, ("forward",))
            or not isinstance(mlp.fc1, nn.Linear)
            or not isinstance(mlp.fc2, nn.Linear)
        ):
            raise TypeError(
                f"Expected blocks[{i}].mlp to be timm's Mlp with Linear fc1/fc2, but got "
                f"{type(mlp).__name__}."
            )
        for ls_name in ("ls1", "ls2"):
            ls = getattr(blk, ls_name)
            if not isinstance(ls, nn.Identity | ls_cls):
                raise TypeError(
                    f"Expected blocks[{i}].{ls_name} to be LayerScale or Identity, but got "
                    f"{type(ls).__name__}."
                )
    overridden = ("forward", "forward_features", "forward_head", "_pos_embed", "pool")
    if not isinstance(model, vit_cls) or (
        type(model) is not distilled_cls and not _same_method(model, vit_cls, overridden)
    ):
        raise TypeError(
            "Expected a timm VisionTransformer (timm.models.vision_transformer.VisionTransformer "
            f"or DeiT's VisionTransformerDistilled), but got {name}."
        )
    embed = model.patch_embed
    if (
        not isinstance(embed, embed_cls)
        or not _same_method(embed, embed_cls, ("forward",))
        or not isinstance(embed.proj, nn.Conv2d)
        or embed.proj.padding_mode != "zeros"
        or not (embed.flatten or model.dynamic_img_size)
    ):
        raise TypeError(
            "Expected patch_embed to be timm's PatchEmbed with a zero-padded Conv2d projection and "
            f"token output, but got {type(embed).__name__}."
        )
    pool = model.global_pool
    if model.attn_pool is not None or pool not in ("token", "avg") or model.pool_include_prefix:
        raise ValueError(
            "Expected global_pool 'token' or 'avg' (patch tokens only) for LRP, but got "
            f"global_pool={pool!r}, attn_pool={type(model.attn_pool).__name__}, "
            f"pool_include_prefix={model.pool_include_prefix}."
        )
    heads = [model.head] + ([model.head_dist] if isinstance(model, distilled_cls) else [])
    if not all(isinstance(h, nn.Linear) for h in heads):
        raise ValueError(
            "Expected a Linear classifier head (num_classes > 0) for LRP, but got "
            f"{', '.join(type(h).__name__ for h in heads)}."
        )
    if isinstance(model, distilled_cls) and model.distilled_training and model.training:
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


def _check_image_size(model: nn.Module, images: Tensor) -> None:
    embed = model.patch_embed
    size = tuple(images.shape[-2:])
    ph, pw = embed.patch_size
    if embed.strict_img_size and embed.img_size is not None and size != tuple(embed.img_size):
        raise ValueError(
            f"Expected images of size {tuple(embed.img_size)} for this model, but got {size}."
        )
    if not embed.dynamic_img_pad and (size[0] % ph or size[1] % pw):
        raise ValueError(
            f"Expected image height and width divisible by the patch size {(ph, pw)}, but got {size}."
        )


def _check_flags(method: str, differentiable: bool, second_order: bool) -> None:
    if differentiable or second_order:
        raise ValueError(
            f"Explainer {method!r} is not differentiable: expected differentiable=False and "
            f"second_order=False, but got differentiable={differentiable}, "
            f"second_order={second_order}."
        )


# --------------------------------------------------------------------------- functional forward


@dataclass
class _BlockCache:
    """Activations of one block that the rules need (all ``(B, N, D)`` unless noted)."""

    x: Tensor  # block input (skip operand of the first residual)
    h1: Tensor  # norm1 output = qkv input
    qs: Tensor  # scaled queries (B, h, N, d)
    k: Tensor  # keys (B, h, N, d)
    v: Tensor  # values (B, h, N, d)
    attn: Tensor  # softmax output (B, h, N, N), the tensor the gradients are taken of
    attn_drop: Tensor  # attn_drop output, the operand of attn @ v (B, h, N, N)
    o: Tensor  # proj input (B, N, A)
    u1: Tensor  # attention branch at the residual
    x1: Tensor  # after the first residual
    h2: Tensor  # norm2 output = fc1 input
    g: Tensor  # fc2 input (B, N, hidden)
    u2: Tensor  # MLP branch at the residual


@dataclass
class _Forward:
    """Everything the backward rules need from one functional forward pass."""

    pixels: Tensor  # conv input (B, C, H', W') (padded if dynamic_img_pad)
    grid: tuple[int, int]  # conv output grid (gh, gw)
    patches: Tensor  # patch tokens before the position embedding (B, P, D)
    pos: Tensor | None  # position embedding as added (1, P or N, D)
    pos_on_prefix: bool  # True: pos added after concatenating the prefix tokens
    blocks: list[_BlockCache]
    tokens: Tensor  # final-norm output (B, N, D)
    head_inputs: list[Tensor]  # (B, D) input(s) of head (and head_dist)
    head_outputs: list[Tensor]  # (B, K) output(s) of head (and head_dist)
    logits: Tensor  # (B, K)


def _layer_scale(ls: nn.Module, x: Tensor) -> Tensor:
    return x if isinstance(ls, nn.Identity) else x * ls.gamma


def _block_forward(blk: nn.Module, x: Tensor) -> tuple[Tensor, _BlockCache]:
    attn, mlp = blk.attn, blk.mlp
    b, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    h1 = blk.norm1(x)
    qkv = attn.qkv(h1).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    qs = q * attn.scale
    a = (qs @ k.transpose(-2, -1)).softmax(dim=-1)
    ad = attn.attn_drop(a)
    o = attn.norm((ad @ v).transpose(1, 2).reshape(b, n, heads * head_dim))
    u1 = blk.drop_path1(_layer_scale(blk.ls1, attn.proj_drop(attn.proj(o))))
    x1 = x + u1
    h2 = blk.norm2(x1)
    g = mlp.norm(mlp.drop1(mlp.act(mlp.fc1(h2))))
    u2 = blk.drop_path2(_layer_scale(blk.ls2, mlp.drop2(mlp.fc2(g))))
    return x1 + u2, _BlockCache(x, h1, qs, k, v, a, ad, o, u1, x1, h2, g, u2)


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


def functional_forward(model: nn.Module, images: Tensor) -> _Forward:
    """Run ``model`` (checked by :func:`check_lrp_model`) layer by layer, keeping what LRP needs.

    Its ``logits`` equal ``model(images)`` (up to the unfused attention's rounding).
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
    if pos is not None and model.dynamic_img_size:
        from timm.layers import resample_abs_pos_embed

        pos = resample_abs_pos_embed(
            pos,
            new_size=grid,
            old_size=embed.grid_size,
            num_prefix_tokens=0 if model.no_embed_class else n_prefix,
        )
    if pos is None:
        tokens = torch.cat([*prefix, patches], dim=1)
    elif model.no_embed_class:
        tokens = torch.cat([*prefix, patches + pos], dim=1)
    else:
        tokens = torch.cat([*prefix, patches], dim=1) + pos
    tokens = model.norm_pre(model.patch_drop(model.pos_drop(tokens)))
    caches = []
    for blk in model.blocks:
        tokens, cache = _block_forward(blk, tokens)
        caches.append(cache)
    tokens = model.norm(tokens)
    if hasattr(model, "head_dist"):
        inputs = [model.head_drop(tokens[:, 0]), model.head_drop(tokens[:, 1])]
        outputs = [model.head(inputs[0]), model.head_dist(inputs[1])]
        logits = (outputs[0] + outputs[1]) / 2
    else:
        if model.global_pool == "token":
            pooled = tokens[:, 0]
        else:
            pooled = tokens[:, model.num_prefix_tokens :].mean(dim=1)
        inputs = [model.head_drop(model.fc_norm(pooled))]
        outputs = [model.head(inputs[0])]
        logits = outputs[0]
    return _Forward(
        x,
        grid,
        patches,
        pos,
        not model.no_embed_class,
        caches,
        tokens,
        inputs,
        outputs,
        logits,
    )


# ------------------------------------------------------------------------ relevance propagation


def head_relprop(model: nn.Module, fwd: _Forward, relevance: Tensor) -> Tensor:
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


def block_relprop(
    blk: nn.Module, cache: _BlockCache, relevance: Tensor, attention_only: bool = False
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
    c, attn = cache, blk.attn
    b, heads, n, head_dim = c.v.shape
    r_x1, r_u2 = add_rule(c.x1, c.u2, relevance)
    r_g = linear_alpha_beta(c.g, blk.mlp.fc2.weight, r_u2)
    r_x1 = r_x1 + linear_alpha_beta(c.h2, blk.mlp.fc1.weight, r_g)  # fork: relevances summed
    r_x, r_u1 = add_rule(c.x, c.u1, r_x1)
    r_o = linear_alpha_beta(c.o, attn.proj.weight, r_u1)
    r_o = r_o.reshape(b, n, heads, head_dim).transpose(1, 2)
    r_attn, r_v = matmul_rule(c.attn_drop, c.v, r_o)
    if attention_only:
        return None, r_attn
    r_q, r_kt = matmul_rule(c.qs, c.k.transpose(-2, -1), r_attn)
    r_qkv = torch.stack([r_q, r_kt.transpose(-2, -1), r_v]).permute(1, 3, 0, 2, 4)
    r_h1 = linear_alpha_beta(c.h1, attn.qkv.weight, r_qkv.reshape(b, n, 3 * heads * head_dim))
    return r_x + r_h1, r_attn


def embed_relprop(model: nn.Module, fwd: _Forward, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance of the first block's input ``(B, N, D)`` -> pixels.

    Returns:
        Relevance of the convolution's input ``(B, C, H', W')`` (the images, padded when
        ``dynamic_img_pad``) and the per-sample relevance ``(B,)`` absorbed by the learned prefix
        tokens and the position embedding.
    """
    total = _total(relevance)
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
    r_pixels = conv_zb(fwd.pixels, model.patch_embed.proj, r_conv)
    absorbed = total - _total(r_pixels)
    return r_pixels, absorbed


def _prefix_values(model: nn.Module, fwd: _Forward) -> Tensor:
    """The concatenated tokens before the position embedding is added ``(B, N, D)``."""
    return torch.cat([*_prefix_tokens(model, fwd.patches.shape[0]), fwd.patches], dim=1)


def start_relevance(logits: Tensor, classes: Tensor) -> Tensor:
    """The LRP start: ``one_hot(classes)`` ``(B, K)`` in the logits' dtype."""
    return F.one_hot(classes, logits.shape[1]).to(logits.dtype)


def propagate(
    model: nn.Module, fwd: _Forward, relevance: Tensor, down_to: int = 0, pixels: bool = False
) -> tuple[dict[int, Tensor], Tensor | None]:
    """Propagate the logits' relevance ``(B, K)`` down to block ``down_to`` (or to the pixels).

    Returns:
        ``{block index: attention relevance (B, h, N, N)}`` for blocks ``>= down_to`` and, when
        ``pixels``, the pixel relevance ``(B, C, H, W)``.
    """
    with torch.no_grad():
        r = head_relprop(model, fwd, relevance)
        attention: dict[int, Tensor] = {}
        for i in range(len(fwd.blocks) - 1, down_to - 1, -1):
            # the last block needed stops at its attention unless the pixels are asked for
            stop = i == down_to and not pixels
            r, attention[i] = block_relprop(model.blocks[i], fwd.blocks[i], r, stop)
        if not pixels:
            return attention, None
        assert r is not None
        return attention, embed_relprop(model, fwd, r)[0]


def contrast_propagate(
    model: nn.Module,
    fwd: _Forward,
    target: Tensor,
    foil: Tensor | None,
    down_to: int = 0,
    pixels: bool = False,
) -> tuple[dict[int, Tensor], Tensor | None]:
    """:func:`propagate` from ``one_hot(target)``; with a foil, the target's relevances minus the
    foil's (each propagated from its own one-hot start).

    The contrast start ``one_hot(target) - one_hot(foil)`` sums to 0, and the normalised addition
    rule rescales each part to a share of that total: it would give 0 everywhere. LRP without the
    normalisation is linear in the start relevance, so the difference of the two propagations is
    the contrast's relevance under the same rules.
    """
    attention, pix = propagate(model, fwd, start_relevance(fwd.logits, target), down_to, pixels)
    if foil is None:
        return attention, pix
    attention_f, pix_f = propagate(model, fwd, start_relevance(fwd.logits, foil), down_to, pixels)
    attention = {i: r - attention_f[i] for i, r in attention.items()}
    return attention, None if pix is None or pix_f is None else pix - pix_f


# ----------------------------------------------------------------------------------- explainers


def _prepare(
    model: nn.Module,
    images: Tensor,
    method: str,
    differentiable: bool,
    second_order: bool,
) -> None:
    _check_flags(method, differentiable, second_order)
    check_images(model, images)
    check_lrp_model(model)
    _check_image_size(model, images)


def _readout(model: nn.Module, relevance: Tensor) -> Tensor:
    b, n = relevance.shape[0], relevance.shape[-1]
    return readout_weights(model, n, relevance.device, relevance.dtype).expand(b, n)


@register_explainer(
    "transformer_attribution",
    output="grid",
    paper="Chefer, Gur & Wolf, Transformer Interpretability Beyond Attention Visualization, CVPR 2021",
    differentiable=False,
)
def transformer_attribution(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    *,
    start_layer: int = 0,
) -> Explanation:
    """LRP relevance of the attention maps weighted by their gradients, rolled out: ``(B, gh, gw)``.

    ``Abar_b = mean_h (dy/dA_b * R_b)^+`` with ``R_b`` the LRP relevance of block ``b``'s
    attention probabilities (start: ``one_hot(target)``; with a foil, the target's ``R_b`` minus
    the foil's, see :func:`contrast_propagate`) and ``y`` the score of
    :func:`relreg.explain.inputs.score`; map = read-out row of ``prod_b (I + Abar_b)`` (later
    blocks on the left, blocks ``>= start_layer``), patch columns. Raw, not normalised.

    Raises:
        ValueError: for ``differentiable=True`` / ``second_order=True``, a bad ``start_layer`` or
            image size, or an unsupported pooling/head.
        TypeError: for a model that is not a timm ViT built from timm ``Block`` s.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> transformer_attribution(model, torch.randn(2, 3, 32, 32)).maps.shape
        torch.Size([2, 4, 4])
    """
    _prepare(model, images, "transformer_attribution", differentiable, second_order)
    _check_start_layer(start_layer, len(model.blocks))
    check_grad_mode("transformer_attribution")
    # the input as a leaf that requires grad: the graph reaches every attention map whatever the
    # parameters' requires_grad flags; the gradients are taken of the attention maps only
    x = images.detach().requires_grad_(True)
    with torch.enable_grad():
        fwd = functional_forward(model, x)
        tgt, fl = resolve_classes(fwd.logits, target, foil)
        used = [c.attn for c in fwd.blocks[start_layer:]]
        grads = torch.autograd.grad(score(fwd.logits, tgt, fl).sum(), used)
    relevance, _ = contrast_propagate(model, fwd, tgt, fl, start_layer)
    with torch.no_grad():
        v = _readout(model, relevance[start_layer])
        for i in range(len(fwd.blocks) - 1, start_layer - 1, -1):
            abar = (grads[i - start_layer] * relevance[i]).clamp(min=0).mean(dim=1)
            v = v + torch.bmm(v.unsqueeze(1), abar)[:, 0]
    return finish(_to_grid(model, images, v), fwd.logits, False)


@register_explainer(
    "partial_lrp",
    output="grid",
    paper="Voita et al., Analyzing Multi-Head Self-Attention, ACL 2019 (as used by Chefer et al., CVPR 2021)",
    differentiable=False,
)
def partial_lrp(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
) -> Explanation:
    """LRP relevance of the last block's attention probabilities: ``(B, gh, gw)``, raw.

    ``mean_h R_L^+`` (positive part, head mean), read-out row, patch columns; the LRP start is
    ``one_hot(target)`` (with a foil: ``R_L`` of the target minus that of the foil).

    Raises:
        ValueError, TypeError: as :func:`transformer_attribution`.
    """
    _prepare(model, images, "partial_lrp", differentiable, second_order)
    with torch.no_grad():
        fwd = functional_forward(model, images.detach())
        tgt, fl = resolve_classes(fwd.logits, target, foil)
        last = len(fwd.blocks) - 1
        relevance, _ = contrast_propagate(model, fwd, tgt, fl, last)
        abar = relevance[last].clamp(min=0).mean(dim=1)
        row = torch.bmm(_readout(model, abar).unsqueeze(1), abar)[:, 0]
    return finish(_to_grid(model, images, row), fwd.logits, False)


@register_explainer(
    "lrp",
    output="pixel",
    paper="Bach et al., Layer-Wise Relevance Propagation, PLoS ONE 2015 (ViT rules of Chefer et al., CVPR 2021)",
    differentiable=False,
)
def lrp(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
) -> Explanation:
    """Full LRP down to the pixels, summed over colour channels: ``(B, H, W)``, raw (signed).

    The start relevance ``one_hot(target)`` is conserved layer by layer except for the share the
    prefix tokens and the position embedding take (see the module docstring). With a foil: the
    target's pixel relevance minus the foil's. With ``dynamic_img_pad`` the padded border's
    relevance is dropped.

    Raises:
        ValueError, TypeError: as :func:`transformer_attribution`.
    """
    _prepare(model, images, "lrp", differentiable, second_order)
    with torch.no_grad():
        fwd = functional_forward(model, images.detach())
        tgt, fl = resolve_classes(fwd.logits, target, foil)
        _, pixels = contrast_propagate(model, fwd, tgt, fl, 0, pixels=True)
        assert pixels is not None
        maps = pixels[..., : images.shape[-2], : images.shape[-1]].sum(dim=1)
    return finish(maps, fwd.logits, False)
