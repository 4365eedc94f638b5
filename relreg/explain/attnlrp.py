"""``attnlrp``: AttnLRP and CP-LRP relevance of the input pixels of a ViT, batched and trainable.

Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin & Samek, "AttnLRP: Attention-Aware
Layer-Wise Relevance Propagation for Transformers", ICML 2024 (``attention="attnlrp"``), and its
recommended ViT setting CP-LRP (Ali et al., ICML 2022; ``attention="cp"``, the default), as LXT
computes them (rachtibat/LRP-eXplains-Transformers, ``lxt/efficient``): one forward pass under
the rules of :class:`relreg.explain.attnlrp_rules.AttnLRPRules`, one backward pass from the
explained score, and the map ``sum_c x * dy/dx`` over the colour channels, ``(B, H, W)``, signed.

The score is the raw logit of the target (or ``y_target - y_foil``, or weights, or a function of
the logits), so the relevance entering the head is the logit itself. ``gamma`` adds the Gamma rule
on the linear layers outside attention (LXT's ViT example, through zennit). The maps of a batch
come from one pass; every rule acts per token, so they equal one call per image.

``differentiable=True`` keeps the graph of the modified backward pass (``create_graph``): a loss
on the map trains the model. The fused attention kernel has no second derivative, so the
attention is then computed explicitly (``(B, heads, N, N)`` per block), and the logits returned
(for a classification loss) come from a second, unmodified forward pass, whose gradients are the
model's own. It is a second-order step: ``second_order`` is implied.

:func:`relreg.explain.tokens.sum_to_patches` sums a pixel map to the patch grid (relevance is
additive), for losses on patch masks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from relreg.explain._contract import (
    Explanation,
    TargetLike,
    check_grad_mode,
    check_images,
    check_logits,
    finish,
    resolve_classes,
    score,
)
from relreg.explain.attnlrp_rules import AttnLRPRules, check_rules
from relreg.explain.capture import kernel_blocks
from relreg.explain.registry import register_explainer

__all__ = ["attnlrp"]


@register_explainer(
    "attnlrp",
    output="pixel",
    paper=(
        "Achtibat et al., AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for "
        "Transformers, ICML 2024 (CP-LRP: Ali et al., ICML 2022)"
    ),
)
def attnlrp(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    attention: str = "cp",
    gamma: float | None = None,
) -> Explanation:
    """AttnLRP relevance of the pixels: ``(B, H, W)``, signed.

    Args:
        model: a ViT whose attention calls ``F.scaled_dot_product_attention`` (every timm ViT
            family; transformers' models with ``attn_implementation="sdpa"``).
        images: ``(B, C, H, W)``.
        target: the explained class (None: top-1), ``(B, K)`` weights or a function of the
            logits.
        foil: a contrast class.
        differentiable: keep the graph (the attention computed explicitly).
        second_order: implied by ``differentiable`` (the map is a gradient).
        attention: ``"cp"`` (CP-LRP: the attention held constant) or ``"attnlrp"`` (AttnLRP's
            softmax and uniform rules).
        gamma: the Gamma rule's gamma on the linear layers outside attention; None: off.

    Returns:
        The maps ``(B, H, W)`` and the logits ``(B, K)``.

    Raises:
        ValueError: for an unknown ``attention``, a negative ``gamma``, or a model with attention
            blocks none of which called ``F.scaled_dot_product_attention``.
    """
    check_grad_mode("attnlrp")
    check_rules(attention, gamma)
    check_images(model, images)
    x = images if images.requires_grad else images.detach().requires_grad_(True)
    rules = AttnLRPRules(model, attention, gamma, dense=differentiable)
    with torch.enable_grad(), rules:
        logits = check_logits(model(x), images.shape[0])
        _check_calls(model, rules.calls)
        tgt, fl = resolve_classes(logits, target, foil)
        (grad,) = torch.autograd.grad(score(logits, tgt, fl).sum(), x, create_graph=differentiable)
    maps = (x * grad).sum(dim=1)
    if differentiable:
        with torch.enable_grad():
            logits = check_logits(model(images), images.shape[0])
    return finish(maps, logits, differentiable)


def _check_calls(model: nn.Module, calls: int) -> None:
    """A model with attention blocks must have called the kernel: otherwise its attention took
    the plain gradient and the map would not be AttnLRP's."""
    blocks = kernel_blocks(model)
    if blocks and calls == 0:
        raise ValueError(
            f"Expected the attention of {type(model).__name__}'s {len(blocks)} blocks to call "
            "F.scaled_dot_product_attention (timm's attention with fused_attn, transformers' "
            "attn_implementation='sdpa'), but the forward pass made no such call: attnlrp "
            "applies its attention rule at that call."
        )
