"""relreg demo end to end in quick mode (3 steps per stage): files, schema, arms."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from relreg.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


def test_demo_quick_writes_results(tmp_path):
    assert (
        main(["demo", "--out", str(tmp_path), "--quick", "--seeds", "0", "--configs", str(CONFIGS)])
        == 0
    )
    result = json.loads((tmp_path / "results" / "demo.json").read_text())
    assert result["seeds"] == [0] and result["quick"] is True
    assert result["arms"] == ["control", "relreg", "counterfactual", "relreg_cf"]
    for arm in ("baseline", *result["arms"]):
        for key in ("id_acc", "ood_acc", "relevance_mass"):
            assert 0.0 <= result[arm][key]["mean"] <= 1.0
            assert len(result[arm][key]["per_seed"]) == 1
    for fig in ("ood_heatmaps.png", "explainers.png"):
        assert (tmp_path / "results" / fig).stat().st_size > 10_000
    # each stage logged to its own offline W&B run
    runs = list(tmp_path.glob("*/wandb/offline-run-*"))
    assert len(runs) == 6
    # each stage leaves the model it tested, and the next stage starts from exactly that file
    ckpt = torch.load(tmp_path / "relreg-seed0" / "final.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["checkpoint"] == str(tmp_path / "bias" / "final.ckpt")
    # relreg evaluate on the stage's final.ckpt reproduces the accuracy the demo reported
    out = tmp_path / "evaluate"
    args = ["evaluate", "--checkpoint", str(tmp_path / "bias" / "final.ckpt")]
    args += ["--data", "shapes:test", "--ood", "ood=shapes:ood", "--methods", "raw_attention"]
    args += ["--steps", "1", "--num-heatmaps", "0", "--out", str(out)]
    assert main(args) == 0
    accuracy = json.loads((out / "report.json").read_text())["models"]["final"]["accuracy"]
    assert accuracy["data"] == result["baseline"]["id_acc"]["mean"]
    assert accuracy["ood"] == result["baseline"]["ood_acc"]["mean"]


def test_demo_without_configs_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--configs", str(tmp_path / "nope")]) == 2
    assert "demo configs" in capsys.readouterr().err
    args = ["demo", "--out", str(tmp_path), "--configs", str(CONFIGS), "--arms", "control", "bias"]
    assert main(args) == 2
    assert "(not arms: ['bias'])" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any stage ran
