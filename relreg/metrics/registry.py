"""Every explanation-quality metric, declared once.

A :class:`MetricSpec` says what a metric is called, how to build it, what ``update`` takes, which
keys its result has (with a description each), whether higher is better, and who uses it:

- ``"callback"``: :class:`relreg.lightning.ExplanationQuality` logs it as ``val/xai/<key>``;
- ``"report"``: ``relreg evaluate`` (:func:`relreg.evaluation.evaluate_models`) puts it in
  ``report.json`` per explainer and draws it in ``before_after.png``;
- ``summary``: the columns ``relreg evaluate`` prints (``{key: column title}``).

Adding a metric is one :func:`register_metric` call; nothing else needs editing (see
``docs/architecture.md``, "Add a metric").

Example:
    >>> from relreg.metrics import list_metrics
    >>> list_metrics("callback")
    ['segmentation', 'pointing_game', 'relevance_mass', 'relevance_rank_accuracy']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn
from torchmetrics import Metric

from relreg.metrics.faithfulness import DeletionInsertionAUC, PerturbationAUC
from relreg.metrics.localization import (
    PointingGame,
    RelevanceMass,
    RelevanceRankAccuracy,
    SegmentationAgreement,
)

__all__ = [
    "USES",
    "MetricSpec",
    "build_metrics",
    "list_metrics",
    "metric_spec",
    "register_metric",
    "report_keys",
]

USES = ("callback", "report")
INPUTS = ("masks", "model")


@dataclass(frozen=True)
class MetricSpec:
    """The declaration of one metric.

    Attributes:
        name: registry name, e.g. ``"relevance_mass"``.
        build: ``build(model=..., unit=..., target_mode=..., steps=...)`` -> a torchmetrics
            ``Metric``; accept ``**context`` and take what you need (``model`` is the classifier).
        outputs: ``{key: description}`` of the result: one key for a scalar ``compute()``, the
            dict's keys for a dict-valued one.
        higher_is_better: the direction of every output.
        inputs: ``"masks"``: ``update(maps, masks (B, H, W))`` on the samples that have a mask,
            with raw ``(B, h, w)`` maps in the callback and raw maps upsampled to ``(B, H, W)``
            pixels in ``relreg evaluate`` (normalise with :func:`relreg.explain.to_pixels` if the
            metric needs it); ``"model"``: ``update(images (B, 3, H, W), maps, target (B,))`` on the
            explained samples (all of them in ``relreg evaluate``, those with a mask in the
            callback).
        used_by: any of :data:`USES`.
        summary: ``{output key: column title}`` printed by ``relreg evaluate`` (may be empty).
        curve: key of the metric's ``curve()`` under the report's ``"curves"``, or None.
    """

    name: str
    build: Callable[..., Metric]
    outputs: Mapping[str, str]
    higher_is_better: bool
    inputs: str = "masks"
    used_by: tuple[str, ...] = USES
    summary: Mapping[str, str] = field(default_factory=dict)
    curve: str | None = None

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"Expected inputs one of {INPUTS}, but got {self.inputs!r}.")
        unknown = sorted(set(self.used_by) - set(USES))
        if unknown:
            raise ValueError(f"Expected used_by among {USES}, but got {unknown}.")
        if not self.outputs:
            raise ValueError(f"Expected at least one output key for metric {self.name!r}.")
        extra = sorted(set(self.summary) - set(self.outputs))
        if extra:
            raise ValueError(f"Expected summary keys among the outputs, but got {extra}.")


_METRICS: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec, overwrite: bool = False) -> MetricSpec:
    """Declare a metric; an existing name needs ``overwrite=True``. Returns ``spec``."""
    if not isinstance(spec, MetricSpec):
        raise TypeError(f"Expected a MetricSpec, but got {type(spec).__name__}.")
    if spec.name in _METRICS and not overwrite:
        raise ValueError(f"Metric {spec.name!r} is already registered; pass overwrite=True.")
    _METRICS[spec.name] = spec
    return spec


def metric_spec(name: str) -> MetricSpec:
    """The declaration of a registered metric."""
    if name not in _METRICS:
        raise ValueError(f"Unknown metric {name!r}; expected one of: {', '.join(_METRICS)}.")
    return _METRICS[name]


def list_metrics(used_by: str | None = None) -> list[str]:
    """Names of the registered metrics (those used by ``used_by`` if given), in declaration order."""
    if used_by is not None and used_by not in USES:
        raise ValueError(f"Expected used_by one of {USES} or None, but got {used_by!r}.")
    return [n for n, s in _METRICS.items() if used_by is None or used_by in s.used_by]


def report_keys(used_by: str = "report") -> dict[str, str]:
    """``{output key: description}`` over the metrics used by ``used_by``, in order."""
    return {k: d for n in list_metrics(used_by) for k, d in _METRICS[n].outputs.items()}


def build_metrics(used_by: str, **context: object) -> dict[str, Metric]:
    """``{name: Metric}`` for every metric used by ``used_by``, built with ``context``."""
    return {n: _METRICS[n].build(**context) for n in list_metrics(used_by)}


def _faithfulness(cls: type[Metric], mode: str) -> Callable[..., Metric]:
    def build(
        model: nn.Module, unit: str = "pixel", target_mode: str = "predicted", steps: int = 10, **_
    ) -> Metric:
        kwargs = {"steps": steps} if cls is DeletionInsertionAUC else {}
        return cls(model, mode=mode, unit=unit, target_mode=target_mode, **kwargs)

    return build


def _localization(cls: type[Metric], **options) -> Callable[..., Metric]:
    return lambda **_: cls(**options)


for _mode, _hi, _short in (("positive", False, "pert+ (lo)"), ("negative", True, "pert- (hi)")):
    register_metric(MetricSpec(
        f"perturbation_{_mode}", _faithfulness(PerturbationAUC, _mode),
        {f"perturbation_{_mode}": f"{_mode} perturbation AUC ({'higher' if _hi else 'lower'} is better)"},
        _hi, inputs="model", used_by=("report",), summary={f"perturbation_{_mode}": _short},
        curve=_mode,
    ))  # fmt: skip
for _mode, _hi, _short in (("deletion", False, "del (lo)"), ("insertion", True, "ins (hi)")):
    register_metric(MetricSpec(
        _mode, _faithfulness(DeletionInsertionAUC, _mode),
        {_mode: f"{_mode} AUC ({'higher' if _hi else 'lower'} is better)"}, _hi, inputs="model",
        used_by=("report",), summary={_mode: _short}, curve=_mode,
    ))  # fmt: skip
register_metric(MetricSpec(
    "segmentation", _localization(SegmentationAgreement),
    {"pixel_accuracy": "segmentation pixel accuracy", "miou": "segmentation mIoU",
     "map": "segmentation mAP"}, True, summary={"miou": "mIoU"},
))  # fmt: skip
register_metric(MetricSpec(
    "pointing_game", _localization(PointingGame), {"pointing_game": "pointing game"}, True
))  # fmt: skip
register_metric(MetricSpec(
    "relevance_mass", _localization(RelevanceMass),
    {"relevance_mass": "relevance mass inside the mask (share of the positive relevance)"}, True,
    summary={"relevance_mass": "mass"},
))  # fmt: skip
register_metric(MetricSpec(
    "relevance_mass_minmax", _localization(RelevanceMass, convention="minmax"),
    {"relevance_mass_minmax": "relevance mass of the min-max normalised map"}, True,
    used_by=("report",),
))  # fmt: skip
register_metric(MetricSpec(
    "relevance_rank_accuracy", _localization(RelevanceRankAccuracy),
    {"relevance_rank_accuracy": "relevance rank accuracy"}, True, used_by=("callback",),
))  # fmt: skip
