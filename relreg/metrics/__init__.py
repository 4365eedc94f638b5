"""Explanation-quality metrics: functional twins and torchmetrics ``Metric`` classes."""

from relreg.metrics.faithfulness import DeletionInsertionAUC, PerturbationAUC
from relreg.metrics.functional import (
    pointing_game,
    relevance_mass,
    relevance_rank_accuracy,
    relevance_share,
    segmentation_agreement,
)
from relreg.metrics.localization import (
    PointingGame,
    RelevanceMass,
    RelevanceRankAccuracy,
    SegmentationAgreement,
)

__all__ = [
    "DeletionInsertionAUC",
    "PerturbationAUC",
    "PointingGame",
    "RelevanceMass",
    "RelevanceRankAccuracy",
    "SegmentationAgreement",
    "pointing_game",
    "relevance_mass",
    "relevance_rank_accuracy",
    "relevance_share",
    "segmentation_agreement",
]
