"""Every explanation-quality metric, declared once.

A :class:`MetricSpec` says how to build a metric, what its ``update`` takes, which keys its result
has and who uses it:

- ``"callback"``: :class:`relreg.lightning.ExplanationQuality` logs it as ``val/xai/<key>``;
- ``"report"``: ``relreg evaluate`` (:func:`relreg.evaluation.evaluate_models`) puts it in
  ``report.json`` per explainer and draws it in ``before_after.png``.

The specs live in :data:`METRICS`, a :class:`relreg.registry.Registry` keyed by metric name.
Whether higher is better is the metric's own torchmetrics attribute
(``metric_spec(name).build(...).higher_is_better``), and how the report shows a metric (panel
titles, summary columns, curves) is :mod:`relreg.evaluation.display`'s. Adding a metric is one
:func:`register_metric` call (see ``docs/architecture.md``, "Add a metric").

Example:
    >>> from relreg.metrics import list_metrics, metric_keys
    >>> list_metrics("callback")[:4]
    ['segmentation', 'pointing_game', 'relevance_mass', 'relevance_rank_accuracy']
    >>> metric_keys("segmentation"), metric_keys("pointing_game")
    (('pixel_accuracy', 'miou', 'map'), ('pointing_game',))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn
from torchmetrics import Metric

from relreg.metrics.complexity import Complexity, EffectiveComplexity, Sparseness
from relreg.metrics.faithfulness import (
    DeletionInsertionAUC,
    FaithfulnessCorrelation,
    PerturbationAUC,
)
from relreg.metrics.localization import (
    LocalizationAUC,
    PointingGame,
    RelevanceMass,
    RelevanceRankAccuracy,
    SegmentationAgreement,
    TopKIntersection,
)
from relreg.metrics.randomisation import RandomLogit
from relreg.registry import Registry

__all__ = [
    "METRICS",
    "USES",
    "MetricSpec",
    "build_metrics",
    "keyed_result",
    "list_metrics",
    "metric_keys",
    "metric_spec",
    "register_metric",
    "report_keys",
]

USES = ("callback", "report")
# top-k intersection's k as a share of the pixels: Quantus' default of 1000 pixels at 224 px
TOP_K = 1000 / 224**2
# faithfulness correlation's subsets per image in the report and the callback: Quantus' 100 are
# 100 forward passes per image and explainer (9x the perturbation test); 20 keep it at about 2x
CORRELATION_RUNS = 20
INPUTS = ("masks", "model", "maps")


@dataclass(frozen=True)
class MetricSpec:
    """The declaration of one metric.

    Attributes:
        build: ``build(model=..., unit=..., target_mode=..., steps=..., method=...,
            explain_options=...)`` -> a torchmetrics ``Metric``; accept ``**context`` and take
            what you need (``model`` is the classifier, ``method`` and ``explain_options`` the
            explainer whose maps the metric gets).
        outputs: the keys of a dict-valued ``compute()``; empty for a scalar one, whose key is
            the metric's name.
        inputs: ``"masks"``: ``update(maps, masks (B, H, W))`` on the samples that have a mask,
            with raw ``(B, h, w)`` maps in the callback and raw maps upsampled to ``(B, H, W)``
            pixels in ``relreg evaluate`` (normalise with :func:`relreg.explain.to_pixels` if the
            metric needs it); ``"model"``: ``update(images (B, 3, H, W), maps, target (B,))`` on
            the explained samples (all of them in ``relreg evaluate``, those with a mask in the
            callback); ``"maps"``: ``update(maps (B, H, W))``, raw maps upsampled to the image's
            pixels, on the explained samples (the maps alone: complexity).
        used_by: any of :data:`USES`.
    """

    build: Callable[..., Metric]
    outputs: tuple[str, ...] = ()
    inputs: str = "masks"
    used_by: tuple[str, ...] = USES

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"Expected inputs one of {INPUTS}, but got {self.inputs!r}.")
        unknown = sorted(set(self.used_by) - set(USES))
        if unknown:
            raise ValueError(f"Expected used_by among {USES}, but got {unknown}.")
        if not isinstance(self.outputs, tuple) or not all(
            isinstance(key, str) and key for key in self.outputs
        ):
            raise TypeError(f"Expected outputs a tuple of key strings, but got {self.outputs!r}.")


def _keys(name: str, spec: MetricSpec) -> tuple[str, ...]:
    return spec.outputs or (name,)


def _check_metric(name: str, spec: MetricSpec) -> None:
    """Refuse a non-spec, and result keys that another metric already has."""
    if not isinstance(spec, MetricSpec):
        raise TypeError(f"Expected metric {name!r} a MetricSpec, but got {type(spec).__name__}.")
    taken = {key: other for other in METRICS if other != name for key in metric_keys(other)}
    clashes = sorted(key for key in _keys(name, spec) if key in taken)
    if clashes:
        owners = sorted({taken[key] for key in clashes})
        raise ValueError(
            f"Expected result keys of metric {name!r} that no other metric has, but {clashes} "
            f"belong to {owners}."
        )


METRICS: Registry[MetricSpec] = Registry("metric", check=_check_metric)


def register_metric(name: str, spec: MetricSpec, *, overwrite: bool = False) -> MetricSpec:
    """Declare a metric as ``name``; a taken name needs ``overwrite=True``. Returns ``spec``."""
    return METRICS.register(name, spec, overwrite=overwrite)


def metric_spec(name: str) -> MetricSpec:
    """The declaration of a registered metric."""
    return METRICS.get(name)


def metric_keys(name: str) -> tuple[str, ...]:
    """The keys of the metric's result: its outputs, or its name for a scalar result."""
    return _keys(name, metric_spec(name))


def keyed_result(name: str, value: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{key: value}`` of what the metric's ``compute()`` returned, in :func:`metric_keys` order.

    Raises:
        ValueError: the result's keys are not the declared ones.
    """
    result = value if isinstance(value, Mapping) else {name: value}
    keys = metric_keys(name)
    if set(result) != set(keys):
        raise ValueError(f"Expected metric {name!r} to compute {keys}, but got {tuple(result)}.")
    return {key: result[key] for key in keys}


def list_metrics(used_by: str | None = None) -> list[str]:
    """Names of the registered metrics (used by ``used_by`` if given), in declaration order."""
    if used_by is not None and used_by not in USES:
        raise ValueError(f"Expected used_by one of {USES} or None, but got {used_by!r}.")
    return [n for n in METRICS.list() if used_by is None or used_by in METRICS.get(n).used_by]


def report_keys(used_by: str = "report") -> list[str]:
    """The result keys of the metrics used by ``used_by``, in declaration order."""
    return [key for name in list_metrics(used_by) for key in metric_keys(name)]


def build_metrics(used_by: str, **context: object) -> dict[str, Metric]:
    """``{name: Metric}`` for every metric used by ``used_by``, built with ``context``."""
    return {name: METRICS.get(name).build(**context) for name in list_metrics(used_by)}


def _perturbation(mode: str) -> Callable[..., Metric]:
    def build(
        model: nn.Module, unit: str = "pixel", target_mode: str = "predicted", **_: object
    ) -> Metric:
        return PerturbationAUC(model, mode=mode, unit=unit, target_mode=target_mode)

    return build


def _deletion_insertion(mode: str) -> Callable[..., Metric]:
    def build(
        model: nn.Module,
        unit: str = "pixel",
        target_mode: str = "predicted",
        steps: int = 10,
        **_: object,
    ) -> Metric:
        return DeletionInsertionAUC(
            model, mode=mode, unit=unit, target_mode=target_mode, steps=steps
        )

    return build


def _faithfulness_correlation(
    model: nn.Module, unit: str = "pixel", target_mode: str = "predicted", **_: object
) -> Metric:
    return FaithfulnessCorrelation(model, runs=CORRELATION_RUNS, unit=unit, target_mode=target_mode)


def _random_logit(
    model: nn.Module,
    method: str = "chefer",
    target_mode: str = "predicted",
    explain_options: Mapping[str, object] | None = None,
    **_: object,
) -> Metric:
    return RandomLogit(model, method, target_mode, explain_options=explain_options)


def _plain(cls: type[Metric], **options: object) -> Callable[..., Metric]:
    return lambda **_: cls(**options)


_REPORT = ("report",)
register_metric(
    "perturbation_positive", MetricSpec(_perturbation("positive"), inputs="model", used_by=_REPORT)
)
register_metric(
    "perturbation_negative", MetricSpec(_perturbation("negative"), inputs="model", used_by=_REPORT)
)
register_metric(
    "deletion", MetricSpec(_deletion_insertion("deletion"), inputs="model", used_by=_REPORT)
)
register_metric(
    "insertion", MetricSpec(_deletion_insertion("insertion"), inputs="model", used_by=_REPORT)
)
register_metric(
    "faithfulness_correlation",
    MetricSpec(_faithfulness_correlation, inputs="model", used_by=_REPORT),
)
register_metric(
    "segmentation",
    MetricSpec(_plain(SegmentationAgreement), outputs=("pixel_accuracy", "miou", "map")),
)
register_metric("pointing_game", MetricSpec(_plain(PointingGame)))
register_metric("relevance_mass", MetricSpec(_plain(RelevanceMass)))
register_metric(
    "relevance_mass_minmax",
    MetricSpec(_plain(RelevanceMass, convention="minmax"), used_by=_REPORT),
)
register_metric(
    "relevance_rank_accuracy",
    MetricSpec(_plain(RelevanceRankAccuracy), used_by=("callback",)),
)
register_metric(
    "top_k_intersection",
    MetricSpec(_plain(TopKIntersection, k=TOP_K)),
)
register_metric("localization_auc", MetricSpec(_plain(LocalizationAUC)))
register_metric("random_logit", MetricSpec(_random_logit, inputs="model"))
register_metric("sparseness", MetricSpec(_plain(Sparseness), inputs="maps"))
register_metric("complexity", MetricSpec(_plain(Complexity), inputs="maps"))
register_metric("effective_complexity", MetricSpec(_plain(EffectiveComplexity), inputs="maps"))
