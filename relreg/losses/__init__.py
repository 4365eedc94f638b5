"""Relevance losses (RobustViT, relevance mass, RRR), background counterfactuals and classification
terms, with module twins."""

from relreg.losses.counterfactual import counterfactual_loss, swap_backgrounds
from relreg.losses.functional import (
    CLASSIFICATION_MODES,
    classification_loss,
    relevance_loss,
    relevance_mass_loss,
    rrr_loss,
)
from relreg.losses.modules import (
    RELEVANCE_LOSSES,
    ClassificationLoss,
    RelevanceLoss,
    RelevanceMassLoss,
    RRRLoss,
    create_relevance_loss,
)

__all__ = [
    "CLASSIFICATION_MODES",
    "RELEVANCE_LOSSES",
    "ClassificationLoss",
    "RRRLoss",
    "RelevanceLoss",
    "RelevanceMassLoss",
    "classification_loss",
    "counterfactual_loss",
    "create_relevance_loss",
    "relevance_loss",
    "relevance_mass_loss",
    "rrr_loss",
    "swap_backgrounds",
]
