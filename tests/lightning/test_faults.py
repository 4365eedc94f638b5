"""Faults and scale-out, each in real ``relreg`` subprocesses:

- a fine-tune killed with SIGKILL in the middle of an epoch and resumed with
  ``relreg fit --ckpt_path last`` ends with the same weights and callback state as an
  uninterrupted run;
- DDP (``strategy=ddp``, gloo, 2 CPU processes) logs the same validation and explanation metrics as
  one process validating the same weights, and the heatmap logger writes once.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

RELREG = str(Path(sys.executable).with_name("relreg"))
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}


class KillAtStep(pl.Callback):
    """Test-only callback: SIGKILL its own process after training step ``step`` (no clean-up)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _config(root: Path, callbacks: list[dict], **trainer) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 3,
            "deterministic": True,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "default_root_dir": str(root),
            "logger": {
                "class_path": "pytorch_lightning.loggers.CSVLogger",
                "init_args": {"save_dir": str(root), "name": "logs"},
            },
            "callbacks": [
                {
                    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True},
                },
                {
                    "class_path": "relreg.lightning.RelevanceHeatmapLogger",
                    "init_args": {"num_images": 3, "seed": 0},
                },
                {
                    "class_path": "relreg.lightning.ExplanationQuality",
                    "init_args": {"num_batches": 100},
                },
                *callbacks,
            ],
            **trainer,
        },
        "model": {
            "model": "vit_tiny_patch16_224",
            "num_classes": 4,
            "model_kwargs": TINY,
            "objective": [
                {"term": "robustvit", "weight": 0.8},
                {"term": "classification", "weight": 0.2},
            ],
            "optimizer": {
                "class_path": "torch.optim.AdamW",
                "init_args": {"lr": 1e-3, "weight_decay": 1e-4},
            },
        },
        "data": {
            "batch_size": 8,
            "eval_batch_size": 8,
            "train": {
                "class_path": "relreg.data.SpuriousShapes",
                "init_args": {"split": "train", "n": 48},
            },
            "val": {
                "class_path": "relreg.data.SpuriousShapes",
                "init_args": {"split": "val", "n": 32},
            },
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _relreg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "WANDB_MODE": "offline",
    }
    proc = subprocess.run([RELREG, *args], capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"relreg {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _last(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    _relreg("fit", "--config", str(_config(tmp_path / "a", [])))
    kill = {"class_path": "tests.lightning.test_faults.KillAtStep", "init_args": {"step": 9}}
    killed = _relreg("fit", "--config", str(_config(tmp_path / "b", [kill])), check=False)
    assert killed.returncode == -signal.SIGKILL
    assert _last(tmp_path / "b")["global_step"] == 6  # the end of epoch 0; step 9 was mid-epoch 1
    _relreg("fit", "--config", str(_config(tmp_path / "b", [])), "--ckpt_path", "last")
    a = _last(tmp_path / "a")
    b = _last(tmp_path / "b")
    assert a["global_step"] == b["global_step"] == 18
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    # callbacks' state: the heatmap images and the last explanation metrics
    assert a["callbacks"].keys() == b["callbacks"].keys()
    ours = {
        k: v for k, v in a["callbacks"].items() if "RelevanceHeatmap" in k or "Explanation" in k
    }
    assert len(ours) == 2 and all(any(state.values()) for state in ours.values())
    for key, state in ours.items():
        for name, value in state.items():
            assert b["callbacks"][key][name] == pytest.approx(value), (key, name)


def _metrics(root: Path) -> dict[str, float]:
    """The last value of every column of the CSV logger's metrics file."""
    (path,) = root.glob("logs/version_*/metrics.csv")
    values: dict[str, float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


@pytest.mark.slow
def test_ddp_two_processes_log_the_metrics_of_one_process(tmp_path):
    ddp = tmp_path / "ddp"
    _relreg("fit", "--config", str(_config(ddp, [], strategy="ddp", devices=2, max_epochs=1)))
    heatmaps = list(tmp_path.rglob("heatmaps/epoch*.png"))
    assert len(heatmaps) == 1  # rank zero only
    logged = _metrics(ddp)
    single = tmp_path / "single"
    config = _config(single, [])
    last = ddp / "checkpoints" / "last.ckpt"
    _relreg("validate", "--config", str(config), "--ckpt_path", str(last))
    expected = _metrics(single)
    keys = [k for k in expected if k.startswith("val/")]
    assert {"val/acc", "val/loss", "val/relevance_mass", "val/xai/relevance_mass"} <= set(keys)
    for key in keys:
        assert logged[key] == pytest.approx(expected[key], abs=1e-5), key


class NaNHead(pl.Callback):
    """Test-only callback: the classifier head is NaN for the given training batches.

    Batches are counted from 0 over the run (-1: every batch), on every rank or on ``rank`` only;
    the head is restored after each.
    """

    def __init__(self, batches: list[int], rank: int | None = None) -> None:
        self.batches = set(batches)
        self.rank = rank
        self.calls = -1
        self.saved = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.calls += 1
        if self.rank not in (None, trainer.global_rank):
            return
        if self.calls in self.batches or -1 in self.batches:
            self.saved = pl_module.model.head.weight.detach().clone()
            with torch.no_grad():
                pl_module.model.head.weight[0, 0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.saved is not None:
            with torch.no_grad():
                pl_module.model.head.weight.copy_(self.saved)
            self.saved = None


@pytest.mark.slow
def test_ddp_ranks_stop_together_at_a_nonfinite_step_and_skip_is_refused(tmp_path):
    """A NaN on rank 1 only: both ranks stop at that step with relreg's one-line error, no hang;
    ``faults: {nonfinite: skip}`` is refused at set-up under DDP (Lightning cannot skip a step
    there)."""
    nan = {
        "class_path": "tests.lightning.test_faults.NaNHead",
        "init_args": {"batches": [1], "rank": 1},
    }
    path = _config(tmp_path, [nan], strategy="ddp", devices=2, max_epochs=1)
    proc = _relreg("fit", "--config", str(path), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    expected = "relreg fit: error: Non-finite loss (on another process) at training step 1"
    assert expected in proc.stderr
    config = yaml.safe_load(path.read_text())
    config["model"]["faults"] = {"nonfinite": "skip"}
    path.write_text(yaml.safe_dump(config))
    proc = _relreg("fit", "--config", str(path), check=False)
    expected = "Expected model.faults.nonfinite 'error' with more than one process"
    assert proc.returncode != 0 and expected in proc.stderr
