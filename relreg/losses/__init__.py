"""Relevance losses (RobustViT, relevance mass, RRR), background counterfactuals, the faithfulness
anchor and classification terms, with module twins and a registry of relevance losses by name."""

from relreg.losses.counterfactual import counterfactual_loss, swap_backgrounds
from relreg.losses.faithful import background_effect_share, faithfulness_loss, occlude_foreground
from relreg.losses.functional import (
    CLASSIFICATION_MODES,
    classification_loss,
    relevance_mass_loss,
    robustvit_loss,
    rrr_loss,
)
from relreg.losses.modules import (
    ClassificationLoss,
    RelevanceMassLoss,
    RobustViTLoss,
    RRRLoss,
)
from relreg.losses.registry import (
    RELEVANCE_LOSSES,
    create_relevance_loss,
    list_relevance_losses,
    register_relevance_loss,
)

__all__ = [
    "CLASSIFICATION_MODES",
    "RELEVANCE_LOSSES",
    "ClassificationLoss",
    "RRRLoss",
    "RelevanceMassLoss",
    "RobustViTLoss",
    "background_effect_share",
    "classification_loss",
    "counterfactual_loss",
    "create_relevance_loss",
    "faithfulness_loss",
    "list_relevance_losses",
    "occlude_foreground",
    "register_relevance_loss",
    "relevance_mass_loss",
    "robustvit_loss",
    "rrr_loss",
    "swap_backgrounds",
]
