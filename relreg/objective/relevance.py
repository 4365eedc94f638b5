"""Relevance terms: losses on the relevance maps of the masked samples.

- ``robustvit``: RobustViT (Chefer, Schwartz & Wolf, "Optimizing Relevance Maps of Vision
  Transformers Improves Robustness", NeurIPS 2022), :func:`relreg.losses.robustvit_loss`.
- ``cft``: Concept-Guided Fine-Tuning (Elisha, Barkan & Koenigstein, CVPR 2026),
  :func:`relreg.losses.cft_loss`: RobustViT's terms as binary cross-entropy, on Chefer maps.
  CFT's classification part is the ``classification`` term with ``target: self`` beside it
  (CFT's ``lambda_align : lambda_acc = 0.8 : 0.2`` are the two terms' weights).
- ``mass``: the energy / relevance-mass loss, :func:`relreg.losses.relevance_mass_loss`.
- ``rrr``: "Right for the Right Reasons" (Ross, Hughes & Doshi-Velez, IJCAI 2017),
  :func:`relreg.losses.rrr_loss`, on raw input-gradient (``saliency``) maps.

Each term names the explainer it expects by default (``method``) and whether that explainer's
maps are min-max normalised before the loss (``normalize``); the module's ``explainer`` setting
overrides the method.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from relreg.losses import CFTLoss, RelevanceMassLoss, RobustViTLoss, RRRLoss
from relreg.objective.context import StepContext
from relreg.objective.term import Term, register_term

__all__ = ["CFTTerm", "MassTerm", "RelevanceTerm", "RobustViTTerm", "RRRTerm"]


class RelevanceTerm(Term):
    """A loss on the pixel maps and masks of the masked samples: ``loss_seg`` (its weighted sum),
    ``loss_bg`` and ``loss_fg``.

    Subclasses set ``method``, ``normalize`` and build ``self.loss``, a module
    ``(pixels (M, H, W), masks (M, H, W)) -> {"loss", "loss_bg", "loss_fg"}``.
    """

    key = "loss_seg"
    needs = frozenset({"pixels", "masks", "maps"})
    method: ClassVar[str] = "chefer"
    normalize: ClassVar[bool] = True
    loss: nn.Module

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.key, "loss_bg", "loss_fg")

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        pixels = ctx.pixels
        if not torch.isfinite(ctx.maps).all():
            # reported by the step (relreg.lightning.nonfinite), not inside the loss
            nan = pixels.new_full((), float("nan"))
            return dict.fromkeys(self.parts, nan)
        out = self.loss(pixels, ctx.masks.to(pixels.dtype))
        return {self.key: out["loss"], "loss_bg": out["loss_bg"], "loss_fg": out["loss_fg"]}

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


@register_term("robustvit")
class RobustViTTerm(RelevanceTerm):
    """RobustViT's relevance loss on Chefer maps.

    Args:
        lambda_bg: background weight (paper: 2).
        lambda_fg: foreground weight (paper: 0.3).
    """

    def __init__(self, lambda_bg: float = 2.0, lambda_fg: float = 0.3) -> None:
        super().__init__()
        self.loss = RobustViTLoss(lambda_bg, lambda_fg)


@register_term("cft")
class CFTTerm(RelevanceTerm):
    """CFT's alignment loss on min-max normalised Chefer maps (CFT's ``generate_relevance``,
    ``src/models/explanations.py`` of yonisGit/cft, is Chefer et al.'s ICCV 2021 rule,
    bilinearly upsampled and min-max normalised, as relreg's ``chefer`` with ``to_pixels``).

    Args:
        lambda_ctx: context (background) weight (CFT: 1.2).
        lambda_concept: concept (foreground) weight (CFT: 0.5).
    """

    def __init__(self, lambda_ctx: float = 1.2, lambda_concept: float = 0.5) -> None:
        super().__init__()
        self.loss = CFTLoss(lambda_ctx, lambda_concept)


@register_term("mass")
class MassTerm(RelevanceTerm):
    """The share of (non-negative) relevance outside the mask, on Chefer maps."""

    def __init__(self) -> None:
        super().__init__()
        self.loss = RelevanceMassLoss()


@register_term("rrr")
class RRRTerm(RelevanceTerm):
    """RRR: the squared input gradient outside the mask, on raw saliency maps."""

    method = "saliency"
    normalize = False

    def __init__(self) -> None:
        super().__init__()
        self.loss = RRRLoss()
