"""``relreg fit|validate|test|predict``: LightningCLI over :class:`RelRegModule` and
:class:`RelRegDataModule`, configured by YAML files in ``configs/`` (``--print_config`` works).

Evaluation needs gradients for the relevance metrics, so the trainer defaults to
``inference_mode=False``. Loggers, callbacks and strategies are Lightning's own, chosen in the config.
Output directories are checked before the command runs, so an unwritable one fails at once;
checkpoints are written atomically (:class:`relreg.lightning.AtomicCheckpointIO`, unless the config
sets another checkpoint IO) and ``--ckpt_path`` is checked before any work
(:func:`relreg.lightning.resume.resolve_ckpt_path`).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningCLI

from relreg.data.datamodule import RelRegDataModule
from relreg.io import check_writable
from relreg.lightning.checkpoint_io import AtomicCheckpointIO
from relreg.lightning.module import RelRegModule
from relreg.lightning.resume import resolve_ckpt_path

__all__ = ["OutputDirError", "RelRegCLI", "output_dirs", "run_cli"]

TRAINER_DEFAULTS = {"inference_mode": False}


class OutputDirError(ValueError):
    """An output, log or checkpoint directory that cannot be written, found before any work."""


class RelRegCLI(LightningCLI):
    """LightningCLI with relreg's module, data module and trainer defaults."""

    def after_instantiate_classes(self) -> None:
        """Before a subcommand runs: fail at once on an output directory that cannot be written.

        Raises:
            OutputDirError: a ``ValueError`` naming the setting and the directory.
        """
        if self.subcommand is not None:
            for what, directory in output_dirs(self.trainer).items():
                try:
                    check_writable(directory, what)
                except ValueError as err:
                    raise OutputDirError(str(err)) from err
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not chosen
            strategy.checkpoint_io = AtomicCheckpointIO()

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the hyperparameters of ``--ckpt_path`` while parsing; a damaged file is
        left to :meth:`_prepare_subcommand_kwargs`, which names it and the newest readable one."""
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError):
            return

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        """Lightning's arguments for the subcommand, with ``ckpt_path`` checked (and ``last``
        replaced by the newest readable checkpoint when the last one is damaged)."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") is not None:
            kwargs["ckpt_path"] = resolve_ckpt_path(kwargs["ckpt_path"], self.trainer, self.model)
        return kwargs


def output_dirs(trainer: Trainer) -> dict[str, Path]:
    """The local directories a run writes to: ``trainer.default_root_dir``, each logger's
    ``save_dir`` (else ``log_dir``) and each ``ModelCheckpoint``'s ``dirpath``, where set."""
    found: dict[str, str | None] = {"trainer.default_root_dir": trainer.default_root_dir}
    for i, logger in enumerate(trainer.loggers):
        name = f"trainer.logger[{i}] ({type(logger).__name__})"
        if logger.save_dir is not None:
            found[f"{name} save_dir"] = logger.save_dir
        else:
            found[f"{name} log_dir"] = getattr(logger, "log_dir", None)
    for i, callback in enumerate(trainer.checkpoint_callbacks):
        found[f"checkpoint callback {i} ({type(callback).__name__}) dirpath"] = callback.dirpath
    return {what: Path(d) for what, d in found.items() if d is not None and "://" not in str(d)}


def run_cli(args: Sequence[str] | None = None, run: bool = True) -> RelRegCLI:
    """Run the Lightning CLI with ``args`` (e.g. ``["fit", "--config", "configs/demo/base.yaml"]``);
    None reads the command line."""
    # The args go through sys.argv: Lightning's DDP launcher starts the other ranks with sys.argv.
    argv = sys.argv if args is None else [sys.argv[0], *args]
    with mock.patch.object(sys, "argv", argv):
        return RelRegCLI(
            RelRegModule,
            RelRegDataModule,
            trainer_defaults=dict(TRAINER_DEFAULTS),
            args=None,
            run=run,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
