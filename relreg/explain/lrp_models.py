"""Which timm models the LRP family covers, and the family code that runs each.

The LRP explainers (:mod:`relreg.explain.lrp`: Bach et al., PLoS ONE 2015, with the transformer
rules of Chefer, Gur & Wolf, CVPR 2021) run a model functionally and propagate relevance through
its blocks with rules written per layer kind (:mod:`relreg.explain.lrp_rules`). This module is
the one place that decides, by the model's class, which family's code applies:

- timm ``VisionTransformer`` (DeiT's distilled variant included): :mod:`relreg.explain.lrp_vit`;
- timm ``Eva`` (EVA / EVA-02, RoPE-ViT, DINOv3: rotary embedding, gated MLPs):
  :mod:`relreg.explain.lrp_eva`;
- timm ``Beit`` (BEiT, BEiT v2: relative position bias): :mod:`relreg.explain.lrp_beit`.

Everything else is refused with an error that names the model's class and what the rules lack
(hierarchical window models such as Swin, NaFlexViT's variable-resolution embedding, any other
module). The CVPR 2021 baseline rules (``rules="cvpr2021_baseline"``,
:mod:`relreg.explain.lrp_baseline`) follow the paper's code, written for its ViT: they are refused
on the other families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from relreg.explain import lrp_beit, lrp_eva, lrp_vit
from relreg.explain.capture import hierarchical_problem
from relreg.explain.lrp_vit import ViTForward, embed_relprop, head_relprop

__all__ = ["LRPFamily", "lrp_family", "check_lrp_model", "functional_forward", "propagate"]


@dataclass(frozen=True)
class LRPFamily:
    """The code of one model family.

    Attributes:
        name: the family, for messages (``"VisionTransformer"``, ``"Eva"``, ``"Beit"``).
        check: raises unless the model's layers are covered.
        forward: the functional forward pass ``(model, images) -> ViTForward``.
        block_relprop: relevance through one block ``(block, cache, relevance, attention_only)
            -> (input relevance or None, attention relevance)``.
    """

    name: str
    check: Callable[[nn.Module], None]
    forward: Callable[[nn.Module, Tensor], ViTForward]
    block_relprop: Callable


VIT = LRPFamily(
    "VisionTransformer", lrp_vit.check_vit_model, lrp_vit.functional_forward, lrp_vit.block_relprop
)
EVA = LRPFamily("Eva", lrp_eva.check_eva_model, lrp_eva.functional_forward, lrp_eva.block_relprop)
BEIT = LRPFamily(
    "Beit", lrp_beit.check_beit_model, lrp_beit.functional_forward, lrp_beit.block_relprop
)

# model classes of timm ViT families the rules do not cover, and what they lack
_NOT_COVERED = {
    "NaFlexVit": (
        "its NaFlexEmbeds embedding (patch sequences of any resolution, padded and masked, with "
        "their own position embedding) has no LRP rule"
    ),
}


def lrp_family(model: nn.Module) -> LRPFamily:
    """The family whose code runs ``model``, by its class (the layers are not checked yet).

    Raises:
        ValueError: for a hierarchical window model (Swin: :func:`hierarchical_problem`).
        TypeError: for any other class.
    """
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    hierarchical = hierarchical_problem(model)
    if hierarchical is not None:
        raise ValueError(f"Expected a ViT with one token sequence for LRP, but {hierarchical}.")
    if isinstance(model, VisionTransformer):
        return VIT
    if isinstance(model, Eva):
        return EVA
    if isinstance(model, Beit):
        return BEIT
    name = type(model).__name__
    why = _NOT_COVERED.get(name, "its layers are not covered by the LRP rules")
    raise TypeError(
        "Expected a timm VisionTransformer (or DeiT's VisionTransformerDistilled), Eva (EVA, "
        f"EVA-02, RoPE-ViT, DINOv3) or Beit (BEiT, BEiT v2) for LRP, but got {name}: {why}."
    )


def check_lrp_model(model: nn.Module, rules: str = "conservative") -> None:
    """Raise unless the LRP rules ``rules`` cover ``model``: its family's check
    (:func:`relreg.explain.lrp_vit.check_vit_model`, :func:`relreg.explain.lrp_eva.check_eva_model`,
    :func:`relreg.explain.lrp_beit.check_beit_model`); the CVPR 2021 baseline rules only on a
    ``VisionTransformer``.

    Raises:
        TypeError: for a model or a layer of another kind.
        ValueError: for a hierarchical model, an unsupported configuration, or the baseline rules
            on another family.
    """
    family = lrp_family(model)
    family.check(model)
    if rules == "cvpr2021_baseline" and family is not VIT:
        raise ValueError(
            "Expected a timm VisionTransformer for rules='cvpr2021_baseline' (the standard LRP "
            f"layers of the CVPR 2021 paper's ViT code), but got {type(model).__name__}: its "
            f"{family.name} blocks have no baseline rules; use rules='conservative'."
        )


def functional_forward(model: nn.Module, images: Tensor) -> ViTForward:
    """The family's functional forward pass of ``model`` (checked by :func:`check_lrp_model`):
    its ``logits`` equal ``model(images)`` up to the unfused attention's rounding."""
    return lrp_family(model).forward(model, images)


def propagate(
    model: nn.Module, fwd: ViTForward, relevance: Tensor, down_to: int = 0, pixels: bool = False
) -> tuple[dict[int, Tensor], Tensor | None]:
    """:func:`relreg.explain.lrp_vit.propagate` under the conservative rules with the family's
    block rule: ``{block index: attention relevance (B, h, N, N)}`` for blocks ``>= down_to`` and,
    when ``pixels``, the pixel relevance ``(B, C, H', W')``."""
    relprops = (head_relprop, lrp_family(model).block_relprop, embed_relprop)
    return lrp_vit.propagate(model, fwd, relevance, down_to, pixels, relprops)
