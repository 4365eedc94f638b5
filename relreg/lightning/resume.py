"""Resume that never dead-ends: ``--ckpt_path FILE|last`` is checked before any work.

A checkpoint must match the digest :class:`relreg.lightning.AtomicCheckpointIO` recorded beside it
(when there is one), load with ``weights_only=True``, hold Lightning's keys (``state_dict``,
``epoch``, ``global_step``) and match the module's parameters by name and shape. A damaged ``FILE``
is a one-line :class:`CheckpointError` naming it and the newest readable checkpoint in its
directory; a damaged ``last`` falls back to that newest readable checkpoint with a warning. Nothing
is deleted.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from relreg.lightning.checkpoint_io import digest_path, file_digest, read_digest

__all__ = ["CheckpointError", "check_checkpoint", "newest_readable", "resolve_ckpt_path"]

REQUIRED_KEYS = ("state_dict", "epoch", "global_step")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


def check_checkpoint(path: str | os.PathLike, module: LightningModule) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a readable checkpoint of ``module``."""
    path = Path(path)
    recorded = read_digest(path)
    if recorded is not None and file_digest(path) != recorded:
        raise CheckpointError(
            f"checkpoint {str(path)!r} differs from what was written (SHA-256 and size recorded in "
            f"{digest_path(path).name}): damaged on disk"
        )
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, bit-flipped, not a checkpoint, needs code to load
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({detail[:160]})") from err
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a Lightning checkpoint (no {missing})"
        )
    own = module.state_dict()
    theirs = state["state_dict"]
    for name, tensor in own.items():
        other = theirs.get(name)
        if other is None:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {name!r}: another architecture")
        if tuple(other.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds {name!r} of shape {tuple(other.shape)}, but the "
                f"model's is {tuple(tensor.shape)}: another architecture or class count"
            )


def newest_readable(
    directory: str | os.PathLike, module: LightningModule, exclude: Path | None = None
) -> Path | None:
    """The most recently written ``*.ckpt`` in ``directory`` passing :func:`check_checkpoint`."""
    candidates = sorted(
        (p for p in Path(directory).glob("*.ckpt") if p.is_file() and p != exclude),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for candidate in candidates:
        try:
            check_checkpoint(candidate, module)
        except CheckpointError:
            continue
        return candidate
    return None


def _last_candidates(trainer: Trainer) -> list[Path]:
    found = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            if "://" not in str(callback.dirpath):
                found += [p for p in Path(callback.dirpath).glob("last*.ckpt") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_ckpt_path(
    ckpt_path: str | os.PathLike | None, trainer: Trainer, module: LightningModule
) -> str | os.PathLike | None:
    """The checkpoint to resume from, checked; ``last`` falls back to the newest readable one.

    Returns:
        ``ckpt_path`` itself when it is None, ``"best"``/``"hpc"``/a remote path (left to
        Lightning), a readable file, or ``"last"`` with no last checkpoint yet (Lightning then
        starts from scratch and says so); otherwise the path of the checkpoint to use.

    Raises:
        CheckpointError: a damaged file, or a damaged ``last`` with no readable checkpoint beside
            it.
    """
    if ckpt_path is None or str(ckpt_path) in ("best", "hpc") or "://" in str(ckpt_path):
        return ckpt_path
    if str(ckpt_path) == "last":
        candidates = _last_candidates(trainer)
        if not candidates:
            return ckpt_path
        last = candidates[0]
        try:
            check_checkpoint(last, module)
            return str(last)
        except CheckpointError as err:
            fallback = newest_readable(last.parent, module, exclude=last)
            if fallback is None:
                raise CheckpointError(
                    f"{err}, and no other checkpoint in {str(last.parent)!r} is readable; "
                    "start without --ckpt_path"
                ) from err
            warnings.warn(f"{err}; resuming from {str(fallback)!r} instead.", stacklevel=2)
            return str(fallback)
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        check_checkpoint(path, module)
    except CheckpointError as err:
        fallback = newest_readable(path.parent, module, exclude=path)
        hint = (
            f"the newest readable checkpoint there is {str(fallback)!r}"
            if fallback is not None
            else f"no checkpoint in {str(path.parent)!r} is readable"
        )
        raise CheckpointError(f"{err}; {hint}") from err
    return ckpt_path
