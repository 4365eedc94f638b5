"""The faithfulness anchor: the background's measured effect share on the decision may not exceed
the map's background share (:mod:`relreg.losses.faithful`)."""

from __future__ import annotations

from torch import Tensor

from relreg.losses import background_effect_share, faithfulness_loss
from relreg.losses.faithful import TRAIN
from relreg.objective.context import StepContext
from relreg.objective.term import Term, register_term

__all__ = ["FaithfulnessTerm"]


@register_term("faithfulness")
class FaithfulnessTerm(Term):
    """``loss_faith``: ties the maps to the decision (two more forward passes over the masked
    samples; training only; at least 2 masked samples).

    Args:
        train: which side the gradient moves: ``"decision"``, ``"both"`` or ``"map"``.
        symmetric: penalise the gap in both directions.
    """

    key = "loss_faith"
    needs = frozenset(
        {"pixels", "maps", "masks", "masked", "masked_logits", "images", "labels", "model"}
    )
    in_validation = False
    min_masked = 2

    def __init__(self, train: str = "decision", symmetric: bool = False) -> None:
        super().__init__()
        if train not in TRAIN:
            raise ValueError(f"Expected train to be one of {TRAIN}, but got {train!r}.")
        self.train_side = train
        self.symmetric = symmetric

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        pixels = ctx.pixels
        images = ctx.images[ctx.masked]
        labels = ctx.labels[ctx.masked]
        share = background_effect_share(
            ctx.model, images, ctx.masks.to(images.dtype), labels, ctx.masked_logits
        )
        loss = faithfulness_loss(pixels, ctx.masks, share, self.train_side, self.symmetric)
        return {self.key: loss}
