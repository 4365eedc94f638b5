"""relreg demo end to end, with a handful of training steps."""

from __future__ import annotations

import json

from relreg.cli import main
from relreg.explain import list_explainers


def test_demo_writes_figure_and_summary(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--steps", "3"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["methods"]) == set(list_explainers())
    for m in summary["methods"].values():
        assert 0.0 <= m["relevance_in_mask"] <= 1.0
    assert (tmp_path / "explainers.png").stat().st_size > 10_000
