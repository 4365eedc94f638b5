"""Explanation-quality metrics and accuracy, all importable from here.

``localization.py`` and ``faithfulness.py`` hold the torchmetrics ``Metric`` classes,
``functional/localization.py`` and ``functional/faithfulness.py`` their functional twins and the
math both share; :mod:`relreg.metrics.registry` declares each metric once.
"""

from relreg.metrics.accuracy import (
    SCORINGS,
    accuracy_targets,
    dataset_accuracy,
    dataset_scores,
    restrict_logits,
    score_logits,
    scoring_classes,
)
from relreg.metrics.complexity import Complexity, EffectiveComplexity, Sparseness
from relreg.metrics.faithfulness import (
    DeletionInsertionAUC,
    FaithfulnessCorrelation,
    FlippingArea,
    PerturbationAUC,
)
from relreg.metrics.functional import (
    complexity,
    deletion_insertion_auc,
    effective_complexity,
    faithfulness_correlation,
    flipping_area,
    group_accuracy,
    localization_auc,
    perturbation_auc,
    pointing_game,
    random_logit,
    relevance_mass,
    relevance_rank_accuracy,
    relevance_share,
    sample_seeds,
    segmentation_agreement,
    sparseness,
    top_k_intersection,
)
from relreg.metrics.groups import GroupAccuracy
from relreg.metrics.localization import (
    LocalizationAUC,
    PointingGame,
    RelevanceMass,
    RelevanceRankAccuracy,
    SegmentationAgreement,
    TopKIntersection,
)
from relreg.metrics.randomisation import RandomLogit
from relreg.metrics.registry import (
    METRICS,
    MetricSpec,
    build_metrics,
    keyed_result,
    list_metrics,
    metric_keys,
    metric_spec,
    register_metric,
    report_keys,
)
from relreg.metrics.sanity import (
    RandomisationResult,
    model_randomisation,
    randomisation_steps,
    sanity_report,
)

__all__ = [
    "METRICS",
    "SCORINGS",
    "Complexity",
    "DeletionInsertionAUC",
    "EffectiveComplexity",
    "FaithfulnessCorrelation",
    "FlippingArea",
    "GroupAccuracy",
    "LocalizationAUC",
    "MetricSpec",
    "PerturbationAUC",
    "PointingGame",
    "RandomLogit",
    "RandomisationResult",
    "RelevanceMass",
    "RelevanceRankAccuracy",
    "SegmentationAgreement",
    "Sparseness",
    "TopKIntersection",
    "accuracy_targets",
    "build_metrics",
    "complexity",
    "dataset_accuracy",
    "dataset_scores",
    "deletion_insertion_auc",
    "effective_complexity",
    "faithfulness_correlation",
    "flipping_area",
    "group_accuracy",
    "keyed_result",
    "list_metrics",
    "localization_auc",
    "metric_keys",
    "metric_spec",
    "model_randomisation",
    "perturbation_auc",
    "pointing_game",
    "random_logit",
    "randomisation_steps",
    "register_metric",
    "relevance_mass",
    "relevance_rank_accuracy",
    "relevance_share",
    "report_keys",
    "restrict_logits",
    "sample_seeds",
    "sanity_report",
    "score_logits",
    "scoring_classes",
    "segmentation_agreement",
    "sparseness",
    "top_k_intersection",
]
