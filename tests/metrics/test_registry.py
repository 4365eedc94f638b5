"""Each metric is declared once; the report, its figures, the summary and the callback read it."""

from __future__ import annotations

import pytest
from torchmetrics import Metric

import relreg.metrics.registry as registry
from relreg.metrics import MetricSpec, list_metrics, metric_spec, register_metric, report_keys


def test_built_in_declarations_keep_the_report_and_callback_keys():
    assert list(report_keys()) == [
        "perturbation_positive", "perturbation_negative", "deletion", "insertion",
        "pixel_accuracy", "miou", "map", "pointing_game", "relevance_mass", "relevance_mass_minmax",
    ]  # fmt: skip
    assert list_metrics("callback") == [
        "segmentation", "pointing_game", "relevance_mass", "relevance_rank_accuracy"
    ]  # fmt: skip
    for name in list_metrics():
        spec = metric_spec(name)
        if spec.inputs == "masks":  # the model-based ones are built in test_evaluate
            metric = spec.build(unit="pixel", target_mode="predicted", steps=2)
            assert isinstance(metric, Metric) and metric.higher_is_better == spec.higher_is_better


def test_declarations_are_checked(monkeypatch):
    monkeypatch.setattr(registry, "_METRICS", dict(registry._METRICS))
    build = lambda **_: None  # noqa: E731
    with pytest.raises(ValueError, match="already registered"):
        register_metric(MetricSpec("relevance_mass", build, {"relevance_mass": "x"}, True))
    with pytest.raises(ValueError, match="Expected inputs one of"):
        MetricSpec("x", build, {"x": "x"}, True, inputs="images")
    with pytest.raises(ValueError, match="Expected used_by among"):
        MetricSpec("x", build, {"x": "x"}, True, used_by=("wandb",))
    with pytest.raises(ValueError, match="Expected summary keys among the outputs"):
        MetricSpec("x", build, {"x": "x"}, True, summary={"y": "Y"})
    with pytest.raises(TypeError, match="Expected a MetricSpec"):
        register_metric({"name": "x"})
    with pytest.raises(ValueError, match="Unknown metric 'nope'"):
        metric_spec("nope")


def test_before_after_grid_sizes_itself_from_the_declared_metrics(monkeypatch, tmp_path):
    from relreg.evaluation import write_figures

    monkeypatch.setattr(registry, "_METRICS", dict(registry._METRICS))
    build = lambda **_: None  # noqa: E731
    for i in range(3):  # 9 report keys + 3 = 12: a 4 x 3 grid, not the old fixed 3 x 3
        register_metric(
            MetricSpec(f"extra{i}", build, {f"extra{i}": f"extra {i}"}, True, used_by=("report",))
        )
    keys = list(report_keys())
    entry = {k: 0.5 for k in keys} | {"curves": {"positive": [1.0] * 10, "negative": [1.0] * 10}}
    report = {
        "methods": ["chefer"], "unit": "pixel", "target": "predicted",
        "fractions": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        "models": {m: {"accuracy": {"data": 0.5}, "explainers": {"chefer": entry}} for m in ("a", "b")},
    }  # fmt: skip
    written = write_figures(report, tmp_path)
    assert (tmp_path / "before_after.png") in written
