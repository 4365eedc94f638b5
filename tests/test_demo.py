"""relreg demo end to end in quick mode (3 steps per stage): files, schema, arms."""

from __future__ import annotations

import json
from pathlib import Path

from relreg.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


def test_demo_quick_writes_results(tmp_path):
    assert (
        main(["demo", "--out", str(tmp_path), "--quick", "--seeds", "0", "--configs", str(CONFIGS)])
        == 0
    )
    result = json.loads((tmp_path / "results" / "demo.json").read_text())
    assert result["seeds"] == [0] and result["quick"] is True
    for arm in ("baseline", "control", "relreg", "relreg_mass"):
        for key in ("id_acc", "ood_acc", "relevance_mass"):
            assert 0.0 <= result[arm][key]["mean"] <= 1.0
            assert len(result[arm][key]["per_seed"]) == 1
    for fig in ("ood_heatmaps.png", "explainers.png"):
        assert (tmp_path / "results" / fig).stat().st_size > 10_000
    # each stage logged to its own offline W&B run
    runs = list(tmp_path.glob("*/wandb/offline-run-*"))
    assert len(runs) == 5


def test_demo_without_configs_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--configs", str(tmp_path / "nope")]) == 2
    assert "demo configs" in capsys.readouterr().err
