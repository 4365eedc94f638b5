"""The benchmark scripts run and write the promised schema (tiny settings: a smoke test, no timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["device"] == "cpu"
    assert set(result["cases"]) == {"plain", "first_order", "second_order", "two_forward"}
    for case in result["cases"].values():
        assert case["step_s"] > 0 and case["peak_mb"] > 0 and case["graph_mb"] > 0
    # the one-forward relreg step keeps less graph than the two-forward step: a property, not a timing
    assert result["cases"]["first_order"]["graph_mb"] < result["cases"]["two_forward"]["graph_mb"]
    assert out.with_suffix(".png").stat().st_size > 10_000
