"""``relreg evaluate`` as a library: which models to evaluate (:mod:`~relreg.evaluation.models`),
the report (:mod:`~relreg.evaluation.report`), how it shows each metric
(:mod:`~relreg.evaluation.display`), its figures (:mod:`~relreg.evaluation.figures`) and the
model-randomisation sanity checks (:mod:`~relreg.evaluation.sanity`).

Example:
    >>> from pathlib import Path
    >>> from relreg.evaluation import EvaluationSettings, ModelSources, run_evaluation
    >>> sources = ModelSources(checkpoints=[Path("runs/demo/bias/final.ckpt")])
    >>> settings = EvaluationSettings(data="shapes:ood:64", out=Path("runs/eval"))
    >>> report = run_evaluation(sources, settings)  # doctest: +SKIP
"""

from relreg.evaluation.display import DISPLAYS, MetricDisplay, register_display
from relreg.evaluation.figures import (
    HeatmapRows,
    displayable,
    heatmap_grid_maps,
    heatmap_rows,
    write_figures,
)
from relreg.evaluation.models import ModelSources, evaluation_models
from relreg.evaluation.report import (
    EvaluationSettings,
    evaluate_models,
    report_lines,
    run_evaluation,
)
from relreg.evaluation.sanity import write_sanity

__all__ = [
    "DISPLAYS",
    "EvaluationSettings",
    "HeatmapRows",
    "MetricDisplay",
    "ModelSources",
    "displayable",
    "evaluate_models",
    "evaluation_models",
    "heatmap_grid_maps",
    "heatmap_rows",
    "register_display",
    "report_lines",
    "run_evaluation",
    "write_figures",
    "write_sanity",
]
