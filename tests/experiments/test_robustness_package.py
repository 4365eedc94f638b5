"""The ``experiments/robustness`` package: its modules import, and the relevance shares the study
reports are per-image shares of the upsampled maps' positive relevance, the published relevance
mass (checked against a loop)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = {
    "protocol": (
        "load_config",
        "drop_source_task",
        "make_split",
        "cue_region",
        "fit",
        "evaluate",
        "summarise",
    ),
    "study": ("run", "gains"),
    "faithfulness": ("faithfulness",),
    "baselines": ("compact", "study_matches", "summarise_gains"),
    "mechanism": ("rule_variants", "patch_keys_values", "gauge_shift", "measure", "cue_share"),
    "plots": ("plot_study", "plot_baselines", "plot_mechanism"),
}


@pytest.fixture
def robustness(monkeypatch):
    """The package, imported as the scripts import it (``experiments/`` on ``sys.path``)."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    return {name: importlib.import_module(f"robustness.{name}") for name in MODULES}


def naive_share(maps, regions):
    """Per image, in float64: bilinear upsampling, positive part, then sum inside / sum; 0 if all
    zero (Arras et al.'s relevance mass accuracy)."""
    import torch
    import torch.nn.functional as F

    out = []
    for m, r in zip(maps, regions, strict=True):
        up = F.interpolate(
            m[None, None].double(), size=tuple(r.shape), mode="bilinear", align_corners=False
        )[0, 0]
        up = up.clamp(min=0)
        total = up.sum().item()
        out.append((up * r.double()).sum().item() / total if total > 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def tiny_config():
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "study" / "robustness.yaml").read_text())
    cfg["image_size"] = 16
    cfg["model"]["kwargs"] = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    cfg["eval"].update(n=8, relevance_n=6)
    cfg["faithfulness"].update(n=8, explainers=["chefer", "rollout"])
    return cfg


def test_the_package_modules_import_and_hold_their_pieces(robustness):
    for name, attrs in MODULES.items():
        module = robustness[name]
        assert module.__doc__, name
        for attr in attrs:
            assert callable(getattr(module, attr)), f"robustness.{name}.{attr}"


@pytest.mark.parametrize("kind", ["tint", "marker", "scenes"])
def test_the_study_relevance_shares_equal_a_per_image_loop(robustness, kind):
    import torch

    from relreg.explain import explain

    protocol = robustness["protocol"]
    cfg = tiny_config()
    torch.manual_seed(0)
    model = protocol.new_model(cfg)
    evals = protocol.eval_splits(cfg, kind)
    out = protocol.evaluate(model, evals, kind, n=6)
    ood = {key: value[:6] for key, value in evals["ood"].items()}
    cue = protocol.cue_region(ood["image"], ood["mask"], kind)
    for region in (ood["mask"], cue):  # relevance_share needs binary regions
        assert set(region.unique().tolist()) <= {0.0, 1.0}
    assert cue.sum() > 0
    maps = explain(model.eval(), ood["image"], "chefer", target=ood["label"])
    assert maps.std() > 0  # not a trivially constant map
    mass = naive_share(maps, ood["mask"])
    on_cue = naive_share(maps, cue)
    assert out["relevance_mass"] == pytest.approx(mass.mean().item(), abs=1e-5)
    assert out["cue_relevance"] == pytest.approx(on_cue.mean().item(), abs=1e-5)
    if kind != "marker":  # the cue's region is the background: the two shares add up to 1
        assert out["relevance_mass"] + out["cue_relevance"] == pytest.approx(1, abs=1e-5)
    # the faithfulness test's shares, per explainer, on its own OOD images
    faith = robustness["faithfulness"].faithfulness(cfg, model, kind)
    data = protocol.make_split(cfg, kind, "ood", 8, seed=2)
    with torch.no_grad():
        pred = model.eval()(data["image"]).argmax(1)
    cue = protocol.cue_region(data["image"], data["mask"], kind)
    for name in ("chefer", "rollout"):
        maps = explain(model, data["image"], name, target=pred)
        row = faith["explainers"][name]
        bg = 1 - naive_share(maps, data["mask"])
        assert row["relevance_bg_share"] == pytest.approx(bg.mean().item(), abs=1e-4)
        assert row["relevance_cue_share"] == pytest.approx(
            naive_share(maps, cue).mean().item(), abs=1e-4
        )


def test_the_mechanism_cue_share_equals_a_per_image_loop(robustness):
    import torch

    g = torch.Generator().manual_seed(0)
    patches = torch.rand(3, 16, generator=g)  # a 4 x 4 patch grid
    cue = (torch.rand(3, 16, 16, generator=g) > 0.7).float()
    expected = naive_share(patches.reshape(3, 4, 4), cue).mean().item()
    assert robustness["mechanism"].cue_share(patches, cue) == pytest.approx(expected, abs=1e-4)
    # a region the study would never pass: not binary
    with pytest.raises(ValueError, match="binary"):
        robustness["mechanism"].cue_share(patches, cue * 0.5)


def test_compact_keeps_only_the_comparisons_benchmarks(robustness):
    """A study over tint and marker can stand in for a marker-only comparison (was a KeyError)."""
    compact = robustness["baselines"].compact
    summarise_gains = robustness["baselines"].summarise_gains
    keys = ("ood_acc", "id_acc", "unbiased_acc", "relevance_mass", "cue_relevance", "follows_cue")
    curve = {"steps": [0, 10], "ood_acc": {"mean": [0.4, 0.6]}}
    control = {k: {"mean": 0.4} for k in keys} | {"curve": curve, "seconds": 3.0}
    arm = {k: {"mean": 0.6} for k in keys} | {"curve": curve, "seconds": 3.0}
    gain = {"m": {"ood_minus_control": 0.2, "id_minus_control": 0.0, "ood_gain_every_seed": True}}
    study = {
        "baselines": {
            k: {"pretrain": {"ood_acc": 0.9}, "bias": {"ood_acc": 0.2}} for k in ("tint", "marker")
        },
        "benchmarks": {k: {"control": dict(control), "m": dict(arm)} for k in ("tint", "marker")},
        "gains": {k: gain for k in ("tint", "marker")},
    }
    both = compact(study)
    assert list(both["benchmarks"]) == ["tint", "marker"]
    assert "seconds" not in both["benchmarks"]["tint"]["m"]
    assert both["benchmarks"]["tint"]["m"]["curve"] == curve  # the recovery curve needs it
    marker = compact(study, ["marker"])
    assert (
        list(marker["benchmarks"])
        == list(marker["gains"])
        == list(marker["baselines"])
        == ["marker"]
    )
    summary = summarise_gains({"0": marker, "1": marker}, ["m"])
    assert list(summary) == ["marker"] and summary["marker"]["m"]["ood_gain"]["mean"] == 0.2
    # recovery: (0.6 - 0.4) / (0.9 - 0.4); undefined when the control lost under a point to biasing
    assert summary["marker"]["m"]["recovery"]["per_baseline"] == [0.4, 0.4]
    marker["baselines"]["marker"]["pretrain"]["ood_acc"] = 0.405
    assert summarise_gains({"0": marker}, ["m"])["marker"]["m"]["recovery"] is None


def test_the_recovery_curve_is_the_recovered_share_at_each_step(robustness, tmp_path):
    """Per baseline, (OOD(step) - final control OOD) / (pretrained OOD - final control OOD), checked
    against the final recovery; the figure is drawn from the JSON."""
    summarise_gains = robustness["baselines"].summarise_gains
    keys = ("ood_acc", "id_acc", "unbiased_acc", "relevance_mass", "cue_relevance", "follows_cue")
    per_baseline = {}
    for b, (pre, ctrl, curve) in enumerate(
        [(0.9, 0.3, [0.3, 0.6, 0.81]), (0.8, 0.4, [0.4, 0.5, 0.72])]
    ):
        control = {k: {"mean": ctrl} for k in keys}
        arm = {k: {"mean": curve[-1]} for k in keys}
        arm["curve"] = {"steps": [0, 50, 100], "ood_acc": {"mean": curve, "std": [0.0] * 3}}
        gain = {"ood_minus_control": curve[-1] - ctrl, "id_minus_control": 0.0}
        per_baseline[str(b)] = {
            "baselines": {"scenes": {"pretrain": {"ood_acc": pre}, "bias": {"ood_acc": 0.3}}},
            "benchmarks": {"scenes": {"control": control, "m": arm}},
            "gains": {"scenes": {"m": gain | {"ood_gain_every_seed": True}}},
        }
    row = summarise_gains(per_baseline, ["m"])["scenes"]["m"]
    expected = [[0.0, 0.5, 0.85], [0.0, 0.25, 0.8]]
    assert row["recovery_curve"]["steps"] == [0, 50, 100]
    for got, want in zip(row["recovery_curve"]["per_baseline"], expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    assert row["recovery_curve"]["mean"] == pytest.approx([0.0, 0.375, 0.825], abs=1e-4)
    assert row["recovery"]["per_baseline"] == [r[-1] for r in row["recovery_curve"]["per_baseline"]]
    result = {"summary": {"scenes": {"m": row}}, "methods": ["m"], "seeds": [0]}
    robustness["plots"].plot_recovery(result, tmp_path / "b_recovery.png")
    assert (tmp_path / "b_recovery.png").stat().st_size > 10_000
    del per_baseline["0"]["benchmarks"]["scenes"]["m"][
        "curve"
    ]  # a baseline without curves: no recovery curve
    assert summarise_gains(per_baseline, ["m"])["scenes"]["m"]["recovery_curve"] is None


def test_a_source_model_keeps_its_first_classes_and_scenes_evaluate_on_held_out_writers(robustness):
    import torch

    protocol = robustness["protocol"]
    cfg = tiny_config()
    torch.manual_seed(0)
    source = protocol.new_model(cfg, num_classes=10)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        before = source(x)[:, :4]
        cut = protocol.keep_classes(source, 4)
        torch.testing.assert_close(cut(x), before)
    assert cut.num_classes == 4
    train = protocol.make_split(cfg, "scenes", "unbiased", 16)
    evals = protocol.make_split(cfg, "scenes", "unbiased", 16, held_out=True)
    assert not torch.equal(train["image"], evals["image"])
    cfg["pretrain"]["distractors"] = 1  # only the training split of the source task has them
    with_distractor = protocol.make_split(cfg, "scenes", "unbiased", 64, num_classes=4)
    assert with_distractor["cue"].max() == 4
    assert protocol.make_split(cfg, "scenes", "unbiased", 64, held_out=True)["cue"].max() < 4


def test_no_source_task_gives_the_protocol_of_the_committed_same_task_run(robustness):
    import argparse
    import json

    import yaml

    scenes = yaml.safe_load((ROOT / "configs" / "study" / "scenes.yaml").read_text())
    result = ROOT / "experiments" / "results" / "robustness_scenes_same_task.json"
    same = json.loads(result.read_text())["config"]
    source = dict(scenes["pretrain"])
    assert source["num_classes"] > scenes["num_classes"] and source["distractors"] > 0
    robustness["protocol"].drop_source_task(argparse.ArgumentParser(), scenes, "scenes.yaml")
    assert scenes["pretrain"] == same["pretrain"]  # no source task, everything else as before
    assert set(same) <= set(scenes)
    for key in set(same) - {"pretrain", "methods"}:
        assert same[key] == scenes[key], key
    # the committed run's arms were written as the old RelRegModule arguments (lambda_seg, ...);
    # the config now states them as objectives (docs/changes.md), so the arms are compared by name
    assert same["methods"] and set(same["methods"]) <= set(scenes["methods"])
