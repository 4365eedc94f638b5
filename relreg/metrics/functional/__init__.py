"""The metrics as functions of one batch, each module the twin of the ``Metric`` module of the
same name one level up (``functional/localization.py`` beside ``localization.py``).

The math lives here once, in private ``_x_update`` / ``_x_compute`` functions; the public
functions chain them and the ``Metric`` classes call the same ones (torchmetrics' layout).

>>> from relreg.metrics.functional import perturbation_auc, relevance_mass
"""

from relreg.metrics.functional.complexity import complexity, effective_complexity, sparseness
from relreg.metrics.functional.faithfulness import (
    PAPER_FRACTIONS,
    black_fill,
    deletion_insertion_auc,
    faithfulness_correlation,
    flipping_area,
    perturbation_auc,
)
from relreg.metrics.functional.groups import group_accuracy, group_counts, group_summary
from relreg.metrics.functional.localization import (
    localization_auc,
    pointing_game,
    relevance_mass,
    relevance_rank_accuracy,
    relevance_share,
    segmentation_agreement,
    top_k_intersection,
)
from relreg.metrics.functional.randomisation import map_ssim, random_logit
from relreg.metrics.functional.sampling import sample_generators, sample_seeds

__all__ = [
    "PAPER_FRACTIONS",
    "black_fill",
    "complexity",
    "deletion_insertion_auc",
    "effective_complexity",
    "faithfulness_correlation",
    "flipping_area",
    "group_accuracy",
    "group_counts",
    "group_summary",
    "localization_auc",
    "map_ssim",
    "perturbation_auc",
    "pointing_game",
    "random_logit",
    "relevance_mass",
    "relevance_rank_accuracy",
    "relevance_share",
    "sample_generators",
    "sample_seeds",
    "segmentation_agreement",
    "sparseness",
    "top_k_intersection",
]
