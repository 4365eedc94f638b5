"""Relevance losses (RobustViT, CFT, relevance mass, RRR), background counterfactuals, the
faithfulness anchor and classification terms, with module twins; configs name them as terms of
the objective (:mod:`relreg.objective`)."""

from relreg.losses.counterfactual import counterfactual_loss, swap_backgrounds
from relreg.losses.faithful import background_effect_share, faithfulness_loss, occlude_foreground
from relreg.losses.functional import (
    CLASSIFICATION_MODES,
    cft_loss,
    classification_loss,
    relevance_mass_loss,
    robustvit_loss,
    rrr_loss,
)
from relreg.losses.modules import (
    CFTLoss,
    ClassificationLoss,
    RelevanceMassLoss,
    RobustViTLoss,
    RRRLoss,
)

__all__ = [
    "CFTLoss",
    "CLASSIFICATION_MODES",
    "ClassificationLoss",
    "RRRLoss",
    "RelevanceMassLoss",
    "RobustViTLoss",
    "background_effect_share",
    "cft_loss",
    "classification_loss",
    "counterfactual_loss",
    "faithfulness_loss",
    "occlude_foreground",
    "relevance_mass_loss",
    "robustvit_loss",
    "rrr_loss",
    "swap_backgrounds",
]
