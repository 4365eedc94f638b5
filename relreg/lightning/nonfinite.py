"""What a training step does with a non-finite loss or relevance map: stop clearly, or skip.

``RelRegModule(faults={"nonfinite": "error"})`` (the default) stops at the first non-finite term
with a :class:`NonFiniteError` that names the step, the batch, the samples (their ``path`` or
``index`` where the dataset gives them), the term and the last checkpoint written. ``"skip"`` skips
that optimiser step instead (``training_step`` returns None: no backward pass, no weight update),
counts it as ``train/skipped_steps`` and still stops after ``max_skipped`` skips in a row; it needs
a single process (Lightning refuses to skip a step under distributed training, and ``RelRegModule``
says so at set-up). Under DDP the ranks agree on every step, so with ``error`` all of them stop at
the same step, whichever rank saw the non-finite term. Neither path writes a checkpoint, so none
holds non-finite weights from such a step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from relreg.objective import StepOutput
from relreg.validate import check_choice, check_positive_int

__all__ = [
    "NONFINITE_POLICIES",
    "NonFiniteError",
    "NonFiniteGuard",
    "nonfinite_message",
    "nonfinite_terms",
]

NONFINITE_POLICIES = ("error", "skip")


class NonFiniteError(FloatingPointError):
    """A loss or relevance map went NaN or Inf; the message says where and what to do."""


def nonfinite_terms(out: StepOutput) -> list[str]:
    """The names of the non-finite values of a step's output: ``relevance`` for its maps, each
    term's parts by name, and ``loss`` for the total.

    Every training step calls it: the flags are gathered on the device and read back once.
    """
    values = {"relevance": out.maps, **out.terms, "loss": out.loss}
    named = {name: value for name, value in values.items() if value is not None}
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in named.values()]).tolist()
    return [name for name, ok in zip(named, finite, strict=True) if not ok]


def _samples(batch: Mapping[str, object], limit: int = 4) -> str:
    for key in ("path", "index"):
        value = batch.get(key)
        if value is None:
            continue
        items = value.tolist() if isinstance(value, Tensor) else list(value)
        shown = ", ".join(Path(str(v)).name if key == "path" else str(v) for v in items[:limit])
        more = f", ... ({len(items)} in all)" if len(items) > limit else ""
        return f"; samples {shown}{more}"
    return ""


def last_checkpoint(trainer: object) -> str | None:
    """The newest checkpoint file the trainer's ``ModelCheckpoint`` callbacks have written."""
    paths = []
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        for attr in ("last_model_path", "best_model_path"):
            path = getattr(callback, attr, "")
            if path and Path(path).is_file():
                paths.append(Path(path))
    return str(max(paths, key=lambda p: p.stat().st_mtime)) if paths else None


def nonfinite_message(
    terms: Sequence[str],
    step: int,
    epoch: int,
    batch_idx: int,
    batch: Mapping[str, object],
    trainer: object,
    skipped_in_row: int = 0,
) -> str:
    """One line: which terms, where, the last good checkpoint and what to do."""
    last = last_checkpoint(trainer)
    where = f"training step {step} (epoch {epoch}, batch {batch_idx}{_samples(batch)})"
    row = f" after {skipped_in_row} skipped steps in a row" if skipped_in_row else ""
    resume = f"the last checkpoint is {last!r}" if last else "no checkpoint was written yet"
    return (
        f"Non-finite {', '.join(terms)} at {where}{row}; {resume}. Lower the learning rate, or set "
        "model.faults: {nonfinite: skip} to skip such steps."
    )


class NonFiniteGuard:
    """The ``nonfinite`` policy of a module, with its count of skipped steps.

    Args:
        policy: ``"error"`` or ``"skip"``.
        max_skipped: with ``"skip"``, stop after this many skipped steps in a row.
    """

    def __init__(self, policy: str = "error", max_skipped: int = 3) -> None:
        check_choice("nonfinite", policy, NONFINITE_POLICIES)
        check_positive_int("max_skipped", max_skipped)
        self.policy = policy
        self.max_skipped = max_skipped
        self.skipped = 0
        self.in_row = 0

    def check_world_size(self, world_size: int) -> None:
        """Refuse ``skip`` with more than one process: Lightning cannot skip a step under DDP."""
        if self.policy == "skip" and world_size > 1:
            raise ValueError(
                "Expected model.faults.nonfinite 'error' with more than one process, "
                "but got 'skip': Lightning cannot skip a step under distributed training."
            )

    def skip(
        self, module: pl.LightningModule, out: StepOutput, batch: Mapping, batch_idx: int
    ) -> bool:
        """True when the training step is to be skipped; raises :class:`NonFiniteError` to stop.

        Logs ``train/skipped_steps`` under the ``"skip"`` policy.
        """
        terms = nonfinite_terms(out)
        # every rank decides the same, so DDP ranks skip or stop together
        flag = torch.tensor(float(bool(terms)), device=out.loss.device)
        if module._trainer is not None:
            flag = module.trainer.strategy.reduce(flag, reduce_op="sum")
        bad = float(flag) > 0
        if bad and (self.policy == "error" or self.in_row >= self.max_skipped):
            raise NonFiniteError(
                nonfinite_message(
                    terms or ["loss (on another process)"],
                    module.global_step,
                    module.current_epoch,
                    batch_idx,
                    batch,
                    module._trainer,
                    self.in_row,
                )
            )
        self.in_row = self.in_row + 1 if bad else 0
        self.skipped += int(bad)
        if self.policy == "skip":
            module.log("train/skipped_steps", float(self.skipped))
        return bad
