"""Fault injection: a full disk and a kill while a checkpoint is written, damaged checkpoints at
resume, non-finite losses. Each write fault is followed by a resume that ends with the weights of an
uninterrupted run."""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import relreg.lightning.checkpoint_io as checkpoint_io
from relreg.data import RelRegDataModule, SpuriousShapes
from relreg.lightning import (
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointWriteError,
    NonFiniteError,
    RelRegModule,
    check_checkpoint,
    resolve_ckpt_path,
)
from tests.lightning.test_faults import NaNHead

TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)
ROOT = Path(__file__).resolve().parents[2]


def _module(**kw) -> RelRegModule:
    torch.manual_seed(0)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-4)
    return RelRegModule(
        "vit_tiny_patch16_224", num_classes=4, model_kwargs=TINY, optimizer=optimizer, **kw
    )


def _fit(root: Path, epochs: int = 3, ckpt_path: str | None = None, module=None, **kw):
    pl.seed_everything(0)
    module = module or _module()
    dm = RelRegDataModule(SpuriousShapes("train", n=16), batch_size=8, seed=0)
    checkpoints = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        callbacks=[checkpoints],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=True,
        default_root_dir=root,
        **kw,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def _weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("full")
    return _weights(_fit(root)), root


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict:
    return uninterrupted_run[0]


class _FailingStream:
    """A file that raises ENOSPC once ``budget`` bytes have been written."""

    def __init__(self, path: str, budget: int) -> None:
        self.f = open(path, "wb")
        self.budget = budget

    def write(self, data: bytes) -> int:
        if self.f.tell() + len(data) > self.budget:
            self.f.write(data[: max(self.budget - self.f.tell(), 0)])
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_full_disk_keeps_the_previous_checkpoint_and_a_resume_matches(
    tmp_path, monkeypatch, uninterrupted
):
    writes = []

    def open_for_write(path):
        writes.append(path)  # epoch 1 writes its two files; then the disk is full
        return open(path, "wb") if len(writes) <= 2 else _FailingStream(path, budget=4096)

    monkeypatch.setattr(checkpoint_io, "_open_for_write", open_for_write)
    with pytest.raises(CheckpointWriteError) as info:
        _fit(tmp_path)
    message = str(info.value)
    assert "no space left on device" in message and "bytes are free there" in message
    assert str(tmp_path / "epoch=1-step=4.ckpt") in message and "no file was written" in message
    needed = int(message.split("it needs ")[1].split(" bytes")[0].replace(",", ""))
    assert needed == (tmp_path / "last.ckpt").stat().st_size  # same model, same state layout
    assert not list(tmp_path.glob(f".*{checkpoint_io.TMP_MARK}*"))  # no temporary file left
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 2

    monkeypatch.setattr(checkpoint_io, "_open_for_write", lambda path: open(path, "wb"))
    resumed = _fit(tmp_path, ckpt_path="last")
    _assert_same(_weights(resumed), uninterrupted)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {root!r})
import relreg.lightning.checkpoint_io as checkpoint_io
from tests.lightning.test_checkpoint_faults import _fit

writes = []

class Killer:
    def __init__(self, path):
        self.f = open(path, "wb")
    def write(self, data):
        self.f.write(data[: len(data) // 2]); self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # half-way through the checkpoint, no clean-up
    def flush(self): self.f.flush()
    def fileno(self): return self.f.fileno()
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()

def open_for_write(path):
    writes.append(path)
    return open(path, "wb") if len(writes) <= 2 else Killer(path)

checkpoint_io._open_for_write = open_for_write
from pathlib import Path
_fit(Path({out!r}))
"""


def test_kill_during_a_checkpoint_write_keeps_the_previous_one_and_a_resume_matches(
    tmp_path, uninterrupted
):
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(KILLED_RUN.format(root=str(ROOT), out=str(tmp_path / "ckpt")))
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    stale = list((tmp_path / "ckpt").glob(f".*{checkpoint_io.TMP_MARK}*"))
    assert len(stale) == 1  # the half-written temporary file; the target was never touched
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 0
    resumed = _fit(tmp_path / "ckpt", ckpt_path="last")
    assert not stale[0].exists()  # removed at the first write into the directory
    _assert_same(_weights(resumed), uninterrupted)


@pytest.fixture
def checkpoints(tmp_path) -> tuple[Path, RelRegModule]:
    module = _fit(tmp_path, epochs=2)
    return tmp_path, module


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one flipped byte inside the tensor data: torch.load would accept it silently
        data[len(data) // 2] ^= 0xFF
        stat = path.stat()
        path.write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as bit rot: mtime unchanged


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_damaged_checkpoints_are_named_and_last_falls_back(checkpoints, how):
    root, module = checkpoints
    newest = root / "epoch=1-step=4.ckpt"
    older = root / "epoch=0-step=2.ckpt"
    _damage(root / "last.ckpt", how)
    with pytest.raises(CheckpointError, match="last.ckpt"):
        check_checkpoint(root / "last.ckpt", module)
    trainer = pl.Trainer(callbacks=[ModelCheckpoint(dirpath=root)], logger=False)
    with pytest.warns(UserWarning, match=f"resuming from '{newest}' instead"):
        assert resolve_ckpt_path("last", trainer, module) == str(newest)
    _damage(newest, how)
    with pytest.raises(CheckpointError, match=f"the newest readable checkpoint there is '{older}'"):
        resolve_ckpt_path(str(newest), trainer, module)
    _damage(older, how)
    with pytest.raises(CheckpointError, match="no other checkpoint .* is readable"):
        resolve_ckpt_path("last", trainer, module)
    assert sorted(p.name for p in root.glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt",
        "epoch=1-step=4.ckpt",
        "last.ckpt",
    ]


def test_a_checkpoint_of_another_architecture_is_refused(checkpoints):
    root, _ = checkpoints
    wider = RelRegModule(
        "vit_tiny_patch16_224", num_classes=4, model_kwargs={**TINY, "embed_dim": 48}
    )
    with pytest.raises(CheckpointError, match="another architecture"):
        check_checkpoint(root / "last.ckpt", wider)


def test_cli_resume_from_a_damaged_file_is_one_line(checkpoints, capsys):
    from relreg.cli import main

    root, _ = checkpoints
    _damage(root / "last.ckpt", "truncated")
    args = ["fit", "--model.model", "vit_tiny_patch16_224", "--model.num_classes", "4"]
    args += ["--model.model_kwargs", str(TINY)]
    args += ["--data.train", "relreg.data.SpuriousShapes", "--data.train.split", "train"]
    args += ["--data.train.n", "16"]
    args += ["--trainer.logger", "false", "--trainer.max_epochs", "3"]
    args += ["--trainer.default_root_dir", str(root / "run")]
    args += ["--ckpt_path", str(root / "last.ckpt")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.ckpt" in err[0] and "cannot be read" in err[0]
    assert "newest readable checkpoint there is" in err[0]


class _Watch(pl.Callback):
    """The model's weights at the start and end of every training batch."""

    def __init__(self) -> None:
        self.start = []
        self.end = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})


def _train(module, callbacks, **kw) -> pl.Trainer:
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=checkpointing,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kw,
    )
    trainer.fit(module, datamodule=RelRegDataModule(SpuriousShapes("train", n=16), batch_size=8))
    return trainer


def test_nonfinite_error_names_the_step_the_terms_and_the_last_checkpoint():
    with pytest.raises(NonFiniteError) as info:
        _train(_module(), [NaNHead([3])], max_steps=6)
    message = str(info.value)
    # the maps, then every term's parts in the objective's order
    assert "Non-finite relevance, loss_seg, loss_bg, loss_fg, loss_cls, loss at" in message
    assert "training step 3 (epoch 1, batch 1" in message
    assert "no checkpoint was written yet" in message
    assert "model.faults: {nonfinite: skip}" in message


def test_nonfinite_error_names_the_last_checkpoint_written(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with pytest.raises(NonFiniteError, match=f"the last checkpoint is '{tmp_path / 'last.ckpt'}'"):
        _train(_module(), [checkpoints, NaNHead([3])], max_steps=6)
    check_checkpoint(tmp_path / "last.ckpt", _module())  # written before the fault, intact


def test_nonfinite_skip_makes_no_update_and_counts():
    module = _module(faults={"nonfinite": "skip"})
    watch = _Watch()
    trainer = _train(module, [NaNHead([1]), watch], max_epochs=2)
    assert module.nonfinite_guard.skipped == 1
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    kept = [k for k in watch.start[0] if k != "head.weight"]  # the one the test sets to NaN
    same = [
        all(torch.equal(a[k], b[k]) for k in kept)
        for a, b in zip(watch.start, watch.end, strict=True)
    ]
    assert same == [False, True, False, False]  # only the skipped batch left the weights alone
    assert all(torch.isfinite(v).all() for v in module.model.state_dict().values())


def test_nonfinite_skip_stops_after_max_skipped_in_a_row():
    module = _module(faults={"nonfinite": "skip", "max_skipped": 2})
    with pytest.raises(NonFiniteError, match="after 2 skipped steps in a row"):
        _train(module, [NaNHead([-1])], max_steps=8)
    assert module.nonfinite_guard.skipped == 2


@pytest.fixture
def small_filesystem(tmp_path, uninterrupted_run):
    """A real tmpfs with room for two and a half checkpoints (skipped where mounting is refused)."""
    size = (uninterrupted_run[1] / "last.ckpt").stat().st_size
    mount = tmp_path / "small"
    mount.mkdir()
    kib = (size * 5 // 2) // 1024
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a size-limited tmpfs here: {proc.stderr.strip() or proc.returncode}"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_file_system_keeps_the_previous_checkpoints(small_filesystem):
    with pytest.raises(CheckpointWriteError, match="no space left on device") as info:
        _fit(small_filesystem)
    assert "it needs" in str(info.value) and "bytes are free there" in str(info.value)
    assert not list(small_filesystem.glob(f".*{checkpoint_io.TMP_MARK}*"))
    for name in ("last.ckpt", "epoch=0-step=2.ckpt"):
        check_checkpoint(small_filesystem / name, _module())
