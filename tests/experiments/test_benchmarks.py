"""The benchmark scripts run and write the promised schema (tiny smoke-test settings, no timing)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASKED = ("first_order", "first_order_deferred", "first_order_dense", "second_order", "two_forward")


def test_bench_train_schema(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "bench_train.py"),
        "--models",
        "vit_tiny_32",
        "--batch",
        "2",
        "--repeats",
        "1",
        "--same-process",  # one import for all cases (CI time); memory is then not per case
        "--cases",
        *ASKED,
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["device"] == "cpu"
    cases = result["cases"]
    assert set(cases) == {"plain", *ASKED}  # the plain step, always measured, and those asked
    for case in cases.values():
        assert case["step_s"] > 0 and case["peak_mb"] > 0 and case["graph_mb"] > 0
        assert case["heap_step_peak_mb"] > 0  # glibc's mallinfo2, read after every operator
        assert sum(case["phases_s"].values()) == pytest.approx(case["step_s"], rel=0.5)
    # properties, not timings: the one-forward step keeps less graph than the two-forward step,
    # the chunked engine less than the dense one; only the chunked engine has relevance phases
    assert cases["first_order"]["graph_mb"] < cases["two_forward"]["graph_mb"]
    assert cases["first_order"]["graph_mb"] < cases["first_order_dense"]["graph_mb"]
    assert cases["first_order"]["phases_s"]["relevance_backward"] > 0
    assert cases["first_order_deferred"]["phases_s"]["relevance_backward"] > 0
    assert cases["first_order_dense"]["phases_s"]["relevance_backward"] == 0
    assert cases["plain"]["phases_s"]["input_gradient_backward"] == 0
    # each phase's floor: the plain step's own phases, plus FLOP-derived parts above them
    ratios = result["models"]["vit_tiny_32"]["ratios"]["first_order"]
    assert set(ratios["phases_over_floor"]) <= set(ratios["floors_s"])
    assert ratios["floors_s"]["forward"] == cases["plain"]["phases_s"]["forward"]
    assert ratios["floor_over_plain_step"] > 1.0
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bench_train_token_sweep_schema(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_train.py"), "--sweep"]
    cmd += ["--models", "vit_tiny_32", "--batch", "2", "--repeats", "1", "--cases", "first_order"]
    cmd += ["--same-process", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "bench_tokens.json").read_text())
    row = result["sweep"]["vit_tiny_32"]
    assert row["tokens"] == 65 and set(row["cases"]) == {"plain", "first_order"}
    assert row["ratios"]["plain"]["time_ratio"] == 1.0
    assert (tmp_path / "bench_tokens.png").stat().st_size > 10_000


def test_bench_train_families_schema(tmp_path):
    # one family (EVA-02-S, rotary) at 32 px: patch 14, rounded up to 42; checkpointing on
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_train.py")]
    cmd += ["--families", "eva02", "--img-size", "32", "--grad-checkpointing"]
    cmd += ["--repeats", "1", "--same-process", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "bench_families_32_ckpt.json").read_text())
    assert result["batch"] == 2 and result["grad_checkpointing"] is True
    assert result["memory_ratio_target"] == 1.3
    row = result["families"]["eva02"]
    assert (row["img_size"], row["tokens"]) == (42, 10)
    assert row["engine"] == "chunked" and set(row["cases"]) == {"plain", "first_order"}
    assert row["cases"]["first_order"]["phases_s"]["relevance_backward"] > 0
    assert row["ratios"]["plain"]["memory_ratio"] == 1.0
    assert (tmp_path / "bench_families_32_ckpt.png").stat().st_size > 10_000


def _tiny_fit_checkpoint(path: Path) -> Path:
    """A relreg-fit-style checkpoint of a 2-block ViT on 32 px images with 4 classes."""
    import timm
    import torch

    torch.manual_seed(0)
    tiny = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **tiny)
    hparams = {"model": "vit_tiny_patch16_224", "num_classes": 4, "model_kwargs": tiny}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    return path


def test_compare_explainers_schema(tmp_path):

    ckpt = _tiny_fit_checkpoint(tmp_path / "final.ckpt")
    out = tmp_path / "compare.json"
    cmd = [sys.executable, str(ROOT / "experiments" / "compare_explainers.py")]
    cmd += ["--checkpoint", str(ckpt), "--n", "4", "--methods", "chefer", "lrp", "rollout"]
    cmd += ["--quiet", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert set(result["table"]) == {"chefer", "lrp", "rollout"}
    for key in ("perturbation_positive", "perturbation_negative", "pixel_accuracy", "miou", "map"):
        assert min(result["ranks"][key].values()) == 1 and max(result["ranks"][key].values()) <= 3
        assert all(row[key] is not None for row in result["table"].values())
    assert out.with_suffix(".png").stat().st_size > 10_000


def _usage_error(script: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run an experiment script in this process up to its argument errors (exit 2): no new
    interpreter, no second import of torch."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(script, run_name="__main__")
    return exit_.value.code, capsys.readouterr().err


def test_robustness_study_schema(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study.json"
    script = str(ROOT / "experiments" / "robustness_study.py")
    cmd = [sys.executable, script, "--quick", "--seeds", "0", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    methods = set(yaml_methods())
    assert set(result["benchmarks"]) == {"tint", "marker"}
    for arms in result["benchmarks"].values():
        assert set(arms) == methods | {"baseline"}
        for name, arm in arms.items():
            for key in ("id_acc", "ood_acc", "unbiased_acc", "relevance_mass", "follows_cue"):
                stats = arm[key]
                assert len(stats["per_seed"]) == (1 if name == "baseline" else 2)
                assert all(0.0 <= v <= 1.0 for v in stats["per_seed"])
                assert abs(stats["mean"] - sum(stats["per_seed"]) / len(stats["per_seed"])) < 1e-3
            # on OOD images the cue never names the label: no prediction follows both
            for acc, cue in zip(
                arm["ood_acc"]["per_seed"], arm["follows_cue"]["per_seed"], strict=True
            ):
                assert acc + cue <= 1 + 1e-6
            if name != "baseline":  # the curve ends at the reported accuracy
                assert arm["curve"]["ood_acc"]["mean"][-1] == arm["ood_acc"]["mean"]
    # the marker cue is found exactly: one (size // 8)^2 square per image
    assert result["faithfulness"]["marker"]["effects"]["cue_area_share"] == round(1 / 64, 4)
    assert result["faithfulness"]["tint"]["effects"]["cue_area_share"] == pytest.approx(
        result["faithfulness"]["tint"]["effects"]["bg_area_share"]
    )
    assert set(result["sweeps"]["per_class"]["results"]["relreg_label"]) == {"2", "1"}
    weights = result["sweeps"]["weight"]
    assert weights["keys"] == {"relreg_label": "robustvit", "counterfactual": "counterfactual"}
    assert set(weights["results"]["relreg_label"]) == {"2.0", "0.5"}
    assert set(weights["results"]["counterfactual"]) == {"1.0", "0.5"}
    for suffix in ("ood_vs_steps", "mass_vs_ood", "faithfulness", "sweeps"):
        assert (tmp_path / f"study_{suffix}.png").stat().st_size > 10_000
    # an existing result is not overwritten without --overwrite; unknown methods are named
    code, err = _usage_error(script, cmd[2:], monkeypatch, capsys)
    assert code == 2 and "--overwrite" in err
    args = [*cmd[2:], "--overwrite", "--methods", "relreg", "nope"]
    code, err = _usage_error(script, args, monkeypatch, capsys)
    assert code == 2 and "unknown ['nope']" in err


def test_robustness_baselines_reuse_the_study_and_summarise(tmp_path):
    experiments = ROOT / "experiments"
    study = tmp_path / "study.json"
    common = ["--quick", "--seeds", "0", "1", "--benchmarks", "marker"]
    subprocess.run(
        [sys.executable, str(experiments / "robustness_study.py"), *common]
        + ["--methods", "relreg_label", "--no-sweeps", "--no-faithfulness", "--out", str(study)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    out = tmp_path / "baselines.json"
    done = subprocess.run(
        [sys.executable, str(experiments / "robustness_baselines.py"), *common]
        + ["--methods", "relreg_label", "--baseline-seeds", "0", "1"]
        + ["--from-study", str(study), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # baseline seed 0 is the study's own run (same quick protocol); seed 1 is trained here
    assert f"baseline seed 0: from {study}" in done.stdout
    assert "baseline seed 1: from" not in done.stdout
    result = json.loads(out.read_text())
    first = json.loads(study.read_text())
    assert result["per_baseline"]["0"]["gains"] == first["gains"]
    assert result["per_baseline"]["0"]["baselines"] == first["baselines"]
    assert result["per_baseline"]["1"]["baselines"] != first["baselines"]
    row = result["summary"]["marker"]["relreg_label"]
    gains = [result["per_baseline"][b]["gains"]["marker"]["relreg_label"] for b in ("0", "1")]
    assert row["ood_gain"]["per_baseline"] == [g["ood_minus_control"] for g in gains]
    assert row["ood_gain"]["mean"] == pytest.approx(
        sum(row["ood_gain"]["per_baseline"]) / 2, abs=1e-4
    )
    assert row["gain_every_seed"] == [g["ood_gain_every_seed"] for g in gains]
    for name in ("baselines.png", "baselines_cue.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_robustness_baselines_define_checks_its_json(tmp_path, monkeypatch, capsys):
    script = str(ROOT / "experiments" / "robustness_baselines.py")
    out = str(tmp_path / "b.json")
    args = ["--define", "x", "{lambda_seg: 1}", "--out", out]
    code, err = _usage_error(script, args, monkeypatch, capsys)
    assert code == 2 and "--define x: expected a JSON object" in err
    args = ["--define", "x", "{}", "--methods", "y", "--out", out]
    code, err = _usage_error(script, args, monkeypatch, capsys)
    assert code == 2 and "unknown ['y']" in err
    code, err = _usage_error(script, ["--steps", "0", "--out", out], monkeypatch, capsys)
    assert code == 2 and "--steps: expected a positive number of steps, but got 0" in err
    code, err = _usage_error(script, ["--no-source-task", "--out", out], monkeypatch, capsys)
    assert code == 2 and "--no-source-task: expected a config whose pretrain stage" in err
    assert "robustness.yaml has none" in err  # the default (shapes) config pre-trains on the task


def test_robustness_mechanism_reimplements_chefer_and_writes_its_schema(tmp_path):
    # the script asserts that its positive_mean rule equals relreg's chefer maps on every model
    out = tmp_path / "mech.json"
    cmd = [sys.executable, str(ROOT / "experiments" / "robustness_mechanism.py"), "--quick"]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert list(result["models"]) == [
        "baseline",
        "control",
        "relreg_label",
        "energy",
        "counterfactual",
    ]
    for row in result["models"].values():
        assert set(row["rule_variants"]) == {
            "positive_mean",
            "negative_mean",
            "abs_mean",
            "positive_max_head",
            "positive_mean_logit_grad",
        }
        assert all(0.0 <= v <= 1.0 for v in row["rule_variants"].values())
        # the tint covers the whole background: the chefer rule's cue share is the explainer's
        assert row["rule_variants"]["positive_mean"] == pytest.approx(
            row["explainers"]["chefer"]["relevance_cue_share"], abs=2e-3
        )
        assert set(row["patching"]) == {"counterfactual", "keys", "values", "keys_and_values"}
    assert result["gauge"]["max_logit_change"] < 1e-3
    assert (tmp_path / "mech.png").stat().st_size > 10_000
    again = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_patching_every_token_gives_the_counterfactual_prediction(monkeypatch):
    # CLS starts from the same embedding in both runs; if every patch token sends the
    # counterfactual's keys and values at every block, CLS's state follows the counterfactual run
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import timm
    import torch
    from robustness.mechanism import patch_keys_values, value_flow

    from relreg.explain import explain

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, num_classes=5
    ).eval()
    x = torch.randn(6, 3, 16, 16)
    x_cf = torch.randn(6, 3, 16, 16)
    everyone = torch.ones(6, 17, dtype=torch.bool)
    everyone[:, 0] = False
    preds = patch_keys_values(model, x, x_cf, everyone)
    assert torch.equal(preds["keys_and_values"], preds["counterfactual"])
    assert not torch.equal(preds["original"], preds["counterfactual"])
    nobody = torch.zeros(6, 17, dtype=torch.bool)
    unchanged = patch_keys_values(model, x, x_cf, nobody)
    for name in ("keys", "values", "keys_and_values"):
        assert torch.equal(unchanged[name], unchanged["original"])
    # the value-bias gauge changes no logit, but it does change the chefer maps
    from robustness.mechanism import ValueBiasGauge

    with torch.no_grad():
        logits = model(x)
    reference = explain(model, x, "chefer", target=logits.argmax(1))
    gauge = ValueBiasGauge(model)
    with gauge, torch.no_grad():
        gauge.bias.normal_(0, 3.0)
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=1e-4)
    with gauge:
        shifted = explain(model, x, "chefer", target=logits.argmax(1))
    assert (shifted - reference).abs().max() > 1e-2
    # ... while the rule on the attention logits' gradient does not move with it
    from robustness.mechanism import rule_variants

    target = logits.argmax(1)
    plain = rule_variants(model, x, target)
    with gauge:
        moved = rule_variants(model, x, target)
    torch.testing.assert_close(
        moved["positive_mean_logit_grad"], plain["positive_mean_logit_grad"], atol=1e-4, rtol=1e-3
    )
    assert (moved["positive_mean"] - plain["positive_mean"]).abs().max() > 1e-2
    torch.testing.assert_close(model(x), logits)  # hooks gone on exit
    # nothing flows from no senders; from every patch token, all but the CLS column does
    flow = value_flow(model, x, nobody)
    assert all(v == 0.0 for values in flow.values() for v in values)
    flow = value_flow(model, x, everyone)
    assert all(0.0 < v < 1.0 for v in flow["cls_attention"] + flow["cls_value_share"])
    assert not model._forward_hooks and all(
        not m.qkv._forward_hooks for m in model.blocks.modules() if hasattr(m, "qkv")
    )


def yaml_methods() -> list[str]:
    import yaml

    return list(
        yaml.safe_load((ROOT / "configs" / "study" / "robustness.yaml").read_text())["methods"]
    )


def test_paper_cost_reads_every_paper_config_and_counts_fused_attention():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import paper_cost
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    models = paper_cost.paper_models()
    assert len(models) == 7 and all({"model", "lr"} <= set(m) for m in models.values())
    q = torch.randn(1, 2, 9, 4, requires_grad=True)
    with FlopCounterMode(display=False) as plain:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    mapping = paper_cost._cpu_attention_formulas()
    with FlopCounterMode(display=False, custom_mapping=mapping) as counted:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    # the CPU kernel is invisible to FlopCounterMode; with the formulas: QK^T and AV forward
    assert plain.get_total_flops() == 0
    assert counted.get_total_flops() >= 2 * (2 * 2 * 9 * 9 * 4)


def test_sanity_checks_schema(tmp_path):
    import argparse

    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import sanity_checks
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    ckpt = _tiny_fit_checkpoint(tmp_path / "final.ckpt")
    out = tmp_path / "sanity.json"
    args = argparse.Namespace(
        checkpoint=ckpt, split="ood", n=3, methods=["rollout", "saliency"], out=out
    )
    sanity_checks.run(args)
    result = json.loads(out.read_text())
    rollout = result["table"]["rollout"]["cascading"]
    assert rollout["steps"][:2] == ["head", "norm"] and rollout["spearman_abs"][0] == 1.0
    assert set(result["table"]["saliency"]) == {"cascading", "independent"}
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bench_explain_chunking_case_and_plot(tmp_path, capsys):
    import argparse

    import numpy as np

    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench_explain
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    for size in (0, 5):
        args = argparse.Namespace(
            model="vit_tiny_patch16_224",
            img_size=32,
            batch=2,
            chunk_case="occlusion",
            chunk_size=size,
            out=tmp_path / f"m{size}.npy",
        )
        bench_explain.chunk_case(args)
        row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert row["peak_rss_mb"] > 0 and row["seconds"] >= 0
    np.testing.assert_allclose(
        np.load(tmp_path / "m5.npy"), np.load(tmp_path / "m0.npy"), atol=1e-5
    )
    rows = [
        {
            "method": m,
            "internal_batch_size": s,
            "peak_rss_mb": 100.0 + (s or 50),
            "seconds": 1.0,
            "max_rel_diff": 0.0,
        }
        for m in bench_explain.CHUNK_METHODS
        for s in (None, 8)
    ]
    result = {
        "model": "m",
        "img_size": 32,
        "batch": 2,
        "options": bench_explain.CHUNK_METHODS,
        "rows": rows,
    }
    bench_explain.plot_chunking(result, tmp_path / "chunking.png")
    assert (tmp_path / "chunking.png").stat().st_size > 10_000
