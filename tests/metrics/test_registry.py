"""Each metric is declared once; the report, its figures, the summary and the callback read it."""

from __future__ import annotations

import pytest
import torch
from torchmetrics import Metric

from relreg.evaluation.display import (
    DISPLAYS,
    MetricDisplay,
    panel_titles,
    register_display,
    summary_columns,
)
from relreg.metrics import (
    METRICS,
    MetricSpec,
    keyed_result,
    list_metrics,
    metric_keys,
    metric_spec,
    register_metric,
    report_keys,
)
from tests.conftest import make_tiny_vit

# issue 32's first metrics: localisation (with masks) and complexity (the maps alone)
NEW = [
    "top_k_intersection",
    "localization_auc",
    "random_logit",
    "sparseness",
    "complexity",
    "effective_complexity",
]
REPORT_KEYS = [
    "perturbation_positive",
    "perturbation_negative",
    "deletion",
    "insertion",
    "faithfulness_correlation",
    "pixel_accuracy",
    "miou",
    "map",
    "pointing_game",
    "relevance_mass",
    "relevance_mass_minmax",
    *NEW,
]
CALLBACK = ["segmentation", "pointing_game", "relevance_mass", "relevance_rank_accuracy", *NEW]


@pytest.fixture
def registries(monkeypatch):
    """Register freely: the metric and display registries are restored afterwards."""
    for registry in (METRICS, DISPLAYS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))


def _build(name: str) -> Metric:
    return metric_spec(name).build(model=make_tiny_vit(), unit="pixel", target_mode="predicted")


def test_built_in_declarations_keep_the_report_and_callback_keys():
    assert report_keys() == REPORT_KEYS
    assert list_metrics("callback") == CALLBACK
    assert metric_keys("segmentation") == ("pixel_accuracy", "miou", "map")


@pytest.mark.parametrize("name", list_metrics())
def test_every_metric_declares_its_direction_and_computes_its_keys(name):
    metric = _build(name)
    assert isinstance(metric, Metric) and isinstance(metric.higher_is_better, bool)
    if metric_spec(name).inputs == "masks":  # the model-based ones compute in test_evaluate
        metric.update(torch.rand(2, 4, 4), (torch.rand(2, 16, 16) > 0.5).float())
        assert tuple(keyed_result(name, metric.compute())) == metric_keys(name)
    if metric_spec(name).inputs == "maps":
        metric.update(torch.rand(2, 16, 16))
        assert tuple(keyed_result(name, metric.compute())) == metric_keys(name)


@pytest.mark.parametrize("name", list_metrics("report"))
def test_the_displayed_direction_is_the_metric_s_own(name):
    """The report's titles state the direction of some metrics: it must be the Metric's."""
    better = "higher" if _build(name).higher_is_better else "lower"
    worse = {"higher": "lower", "lower": "higher"}[better]
    for key in metric_keys(name):
        assert f"{worse} is better" not in panel_titles()[key]
        assert f"({worse[:2]})" not in summary_columns().get(key, "")


def test_the_summary_and_the_panels_keep_their_titles():
    assert summary_columns() == {
        "perturbation_positive": "pert+ (lo)",
        "perturbation_negative": "pert- (hi)",
        "deletion": "del (lo)",
        "insertion": "ins (hi)",
        "faithfulness_correlation": "faith r",
        "miou": "mIoU",
        "relevance_mass": "mass",
        "localization_auc": "loc AUC",
    }
    assert list(panel_titles()) == REPORT_KEYS
    assert panel_titles()["deletion"] == "deletion AUC (lower is better)"


def test_declarations_are_checked(registries):
    build = lambda **_: None  # noqa: E731
    with pytest.raises(ValueError, match="Expected a new metric name, but 'relevance_mass' is"):
        register_metric("relevance_mass", MetricSpec(build))
    with pytest.raises(ValueError, match="Expected inputs one of"):
        MetricSpec(build, inputs="images")
    with pytest.raises(ValueError, match="Expected used_by among"):
        MetricSpec(build, used_by=("wandb",))
    with pytest.raises(TypeError, match="Expected outputs a tuple of key strings"):
        MetricSpec(build, outputs={"x": "x"})
    with pytest.raises(TypeError, match="Expected metric 'x' a MetricSpec"):
        register_metric("x", {"name": "x"})
    with pytest.raises(ValueError, match=r"\['miou'\] belong to \['segmentation'\]"):
        register_metric("miou", MetricSpec(build))
    with pytest.raises(ValueError, match="Unknown metric 'nope'; expected one of: perturbation"):
        metric_spec("nope")
    with pytest.raises(ValueError, match=r"Expected metric 'pointing_game' to compute \('poin"):
        keyed_result("pointing_game", {"hits": torch.tensor(1.0)})
    register_metric("x", MetricSpec(build, used_by=("report",)))
    with pytest.raises(ValueError, match=r"among the result keys of metric 'x' \('x',\).*\['y'\]"):
        register_display("x", MetricDisplay(summary={"y": "Y"}))
    with pytest.raises(ValueError, match="Unknown metric 'nope'"):
        register_display("nope", MetricDisplay())
    with pytest.raises(TypeError, match="Expected the display of metric 'x' a MetricDisplay"):
        register_display("x", {"summary": {}})
    assert panel_titles()["x"] == "x" and "x" not in summary_columns()


def test_before_after_grid_sizes_itself_from_the_declared_metrics(registries, tmp_path):
    from relreg.evaluation import write_figures

    build = lambda **_: None  # noqa: E731
    for i in range(3):  # 10 report keys + 3 = 13: a 5 x 3 grid, not the old fixed 3 x 3
        register_metric(f"extra{i}", MetricSpec(build, used_by=("report",)))
        register_display(f"extra{i}", MetricDisplay(titles={f"extra{i}": f"extra {i}"}))
    keys = report_keys()
    entry = {k: 0.5 for k in keys} | {"curves": {"positive": [1.0] * 10, "negative": [1.0] * 10}}
    report = {
        "methods": ["chefer"],
        "unit": "pixel",
        "target": "predicted",
        "fractions": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        "models": {
            m: {"accuracy": {"data": 0.5}, "explainers": {"chefer": entry}} for m in ("a", "b")
        },
    }
    written = write_figures(report, tmp_path)
    assert (tmp_path / "before_after.png") in written
