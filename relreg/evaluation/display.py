"""How ``relreg evaluate`` shows each metric: panel titles, summary columns and curve names.

What a metric is (how it is built, the keys of its result, who uses it) is declared once in
:mod:`relreg.metrics.registry`, and whether higher is better is the metric's own torchmetrics
``higher_is_better``. This module holds only the report's presentation of the metrics, a
:class:`MetricDisplay` per metric name in :data:`DISPLAYS`. A report metric without one is shown
under its result keys, with no column in the printed summary and no curve.

Example:
    >>> from relreg.evaluation.display import summary_columns
    >>> summary_columns()["miou"]
    'mIoU'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from relreg.metrics import list_metrics, metric_keys, report_keys
from relreg.registry import Registry

__all__ = [
    "DISPLAYS",
    "MetricDisplay",
    "curve_names",
    "panel_titles",
    "register_display",
    "summary_columns",
]


@dataclass(frozen=True)
class MetricDisplay:
    """How the report shows one metric.

    Attributes:
        titles: ``{result key: title}`` of the key's panel in ``before_after.png``; a key
            without one is titled with the key.
        summary: ``{result key: column title}`` printed by ``relreg evaluate`` (may be empty).
        curve: key of the metric's ``curve()`` under the report's ``"curves"``, or None.
    """

    titles: Mapping[str, str] = field(default_factory=dict)
    summary: Mapping[str, str] = field(default_factory=dict)
    curve: str | None = None


def _check_display(name: str, display: MetricDisplay) -> None:
    """Refuse a non-display, and keys that are not among the metric's result keys."""
    if not isinstance(display, MetricDisplay):
        raise TypeError(
            f"Expected the display of metric {name!r} a MetricDisplay, but got "
            f"{type(display).__name__}."
        )
    extra = sorted(set(display.titles) - set(metric_keys(name)))
    extra += sorted(set(display.summary) - set(metric_keys(name)))
    if extra:
        raise ValueError(
            f"Expected title and summary keys among the result keys of metric {name!r} "
            f"{metric_keys(name)}, but got {extra}."
        )


DISPLAYS: Registry[MetricDisplay] = Registry("metric display", check=_check_display)


def register_display(
    name: str, display: MetricDisplay, *, overwrite: bool = False
) -> MetricDisplay:
    """Say how the report shows the registered metric ``name``. Returns ``display``."""
    return DISPLAYS.register(name, display, overwrite=overwrite)


def _displays() -> dict[str, MetricDisplay]:
    """``{name: display}`` of the report's metrics, in declaration order."""
    return {name: DISPLAYS.get(name) for name in list_metrics("report") if name in DISPLAYS}


def panel_titles() -> dict[str, str]:
    """``{result key: panel title}`` over the report's keys, in order."""
    titles = {
        key: title for display in _displays().values() for key, title in display.titles.items()
    }
    return {key: titles.get(key, key) for key in report_keys()}


def summary_columns() -> dict[str, str]:
    """``{result key: column title}`` of the printed summary, in order."""
    return {
        key: title for display in _displays().values() for key, title in display.summary.items()
    }


def curve_names() -> dict[str, str]:
    """``{metric name: curve key}`` of the report's metrics that have a curve."""
    return {name: d.curve for name, d in _displays().items() if d.curve is not None}


register_display(
    "perturbation_positive",
    MetricDisplay(
        titles={"perturbation_positive": "positive perturbation AUC (lower is better)"},
        summary={"perturbation_positive": "pert+ (lo)"},
        curve="positive",
    ),
)
register_display(
    "perturbation_negative",
    MetricDisplay(
        titles={"perturbation_negative": "negative perturbation AUC (higher is better)"},
        summary={"perturbation_negative": "pert- (hi)"},
        curve="negative",
    ),
)
register_display(
    "deletion",
    MetricDisplay(
        titles={"deletion": "deletion AUC (lower is better)"},
        summary={"deletion": "del (lo)"},
        curve="deletion",
    ),
)
register_display(
    "insertion",
    MetricDisplay(
        titles={"insertion": "insertion AUC (higher is better)"},
        summary={"insertion": "ins (hi)"},
        curve="insertion",
    ),
)
register_display(
    "faithfulness_correlation",
    MetricDisplay(
        titles={"faithfulness_correlation": "faithfulness correlation (higher is better)"},
        summary={"faithfulness_correlation": "faith r"},
    ),
)
register_display(
    "segmentation",
    MetricDisplay(
        titles={
            "pixel_accuracy": "segmentation pixel accuracy",
            "miou": "segmentation mIoU",
            "map": "segmentation mAP",
        },
        summary={"miou": "mIoU"},
    ),
)
register_display("pointing_game", MetricDisplay(titles={"pointing_game": "pointing game"}))
register_display(
    "relevance_mass",
    MetricDisplay(
        titles={
            "relevance_mass": "relevance mass inside the mask (share of the positive relevance)"
        },
        summary={"relevance_mass": "mass"},
    ),
)
register_display(
    "relevance_mass_minmax",
    MetricDisplay(titles={"relevance_mass_minmax": "relevance mass of the min-max normalised map"}),
)
register_display(
    "top_k_intersection",
    MetricDisplay(titles={"top_k_intersection": "top-k intersection (higher is better)"}),
)
register_display(
    "localization_auc",
    MetricDisplay(
        titles={"localization_auc": "localization ROC AUC (higher is better)"},
        summary={"localization_auc": "loc AUC"},
    ),
)
register_display(
    "sparseness", MetricDisplay(titles={"sparseness": "sparseness, Gini (higher is sparser)"})
)
register_display(
    "complexity", MetricDisplay(titles={"complexity": "complexity, entropy (lower is simpler)"})
)
register_display(
    "effective_complexity",
    MetricDisplay(titles={"effective_complexity": "effective complexity, pixels (lower)"}),
)
register_display(
    "random_logit",
    MetricDisplay(titles={"random_logit": "random-logit SSIM (lower is better)"}),
)
