"""The background-counterfactual term: a masked sample's prediction must not change when its
background is swapped for another's (:mod:`relreg.losses.counterfactual`)."""

from __future__ import annotations

from torch import Tensor

from relreg.losses import counterfactual_loss
from relreg.objective.context import StepContext
from relreg.objective.term import Term, register_term

__all__ = ["CounterfactualTerm"]


@register_term("counterfactual")
class CounterfactualTerm(Term):
    """``loss_cf``: the divergence between the clean and background-swapped predictions of the
    masked samples (one more forward pass over them; training only; at least 2 masked samples,
    since the backgrounds come from the batch)."""

    key = "loss_cf"
    needs = frozenset({"logits", "masked", "swapped_logits"})
    in_validation = False
    min_masked = 2

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        return {self.key: counterfactual_loss(ctx.logits[ctx.masked], ctx.swapped_logits)}
