"""``experiments/gpu_check.py --dry-run``: the GPU check's code path runs on CPU with tiny sizes
and writes its one JSON with every section (the engines agree within their tolerances), in a
process where jsonargparse and wandb cannot be imported, as on the GPU machine's image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    without = (  # the GPU image has neither: importing them must not be needed
        "import runpy, sys; sys.modules['jsonargparse'] = None; sys.modules['wandb'] = None; "
        f"sys.argv = ['gpu_check.py', '--dry-run', '--out', {str(out)!r}]; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    # earlier in-process DDP tests can leave a cluster's variables in os.environ, which would make
    # the subprocess's Trainer think it is one rank of two
    cluster = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in cluster and not k.startswith("PL_")}
    done = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["device"] == "cpu"
    assert set(report["engines"]) == {"float32", "bfloat16"}  # float16 autocast: CUDA only
    assert all(entry["ok"] for entry in report["engines"].values()), report["engines"]
    row = report["step_cost"]["32"]
    assert row["first_order"]["phases_s"]["relevance_backward"] > 0  # the chunked engine ran
    assert row["memory_ratio"] is None  # CPU memory of cases in one process: not separable
    assert report["fine_tune"]["steps"] == 2 and "val/acc" in report["fine_tune"]["val"]
