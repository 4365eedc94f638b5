"""``relreg fit|validate|test|predict``: LightningCLI over :class:`RelRegModule` and
:class:`RelRegDataModule`, configured by YAML files in ``configs/`` (``--print_config`` works).

Evaluation needs gradients for the relevance metrics, so the trainer defaults to
``inference_mode=False``. Loggers, callbacks and strategies are Lightning's own, chosen in the
config. Output directories are checked before the command runs, so an unwritable one fails at once;
checkpoints are written atomically (:class:`relreg.lightning.AtomicCheckpointIO`, unless the
config sets another checkpoint IO) and ``--ckpt_path`` is checked before any work
(:func:`relreg.lightning.resume.resolve_ckpt_path`).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import Trainer
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from relreg.data.datamodule import RelRegDataModule
from relreg.io import check_writable
from relreg.lightning.checkpoint_io import AtomicCheckpointIO
from relreg.lightning.connect import connect
from relreg.lightning.module import RelRegModule
from relreg.lightning.resume import resolve_ckpt_path

__all__ = ["OutputDirError", "RelRegCLI", "output_dirs", "run_cli"]

TRAINER_DEFAULTS = {"inference_mode": False}
# what torch.load raises on a truncated, bit-flipped or foreign file
_UNREADABLE = (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError)


class OutputDirError(ValueError):
    """An output, log or checkpoint directory that cannot be written, found before any work."""


class RelRegCLI(LightningCLI):
    """LightningCLI with relreg's module, data module and trainer defaults.

    ``--ckpt_path`` is handled through LightningCLI's public hooks: :meth:`parse_arguments` takes
    it out of the parsed config (so that Lightning does not read it while parsing, which fails on a
    damaged file with a traceback), applies the checkpoint's hyperparameters to the model's config
    as Lightning would when the file is readable, and :meth:`before_instantiate_classes` puts it
    back; :meth:`after_instantiate_classes` then checks it (:func:`resolve_ckpt_path`, which names
    a damaged file and the newest readable one, or replaces a damaged ``last``).
    """

    _ckpt_path: str | None = None

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse the command line into ``self.config``, holding ``--ckpt_path`` back.

        Args:
            parser (LightningArgumentParser): the CLI's parser.
            args (ArgsType): what LightningCLI was given (None: ``sys.argv``).
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        self._ckpt_path = self.config[subcommand].get("ckpt_path")
        self.config[subcommand]["ckpt_path"] = None  # Lightning's own read of it is skipped
        hparams = _checkpoint_hparams(self._ckpt_path)
        if hparams:
            try:
                self.config = parser.parse_object({subcommand: {"model": hparams}}, self.config)
            except SystemExit:
                sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
                raise

    def before_instantiate_classes(self) -> None:
        """Put ``--ckpt_path`` back into the config (and so into the saved ``config.yaml``)."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            self.config[subcommand]["ckpt_path"] = self._ckpt_path

    def after_instantiate_classes(self) -> None:
        """Before a subcommand runs: connect the module and the data module
        (:func:`relreg.lightning.connect`), fail at once on an output directory that cannot be
        written, write checkpoints atomically unless the config chose a checkpoint IO, and check
        ``--ckpt_path`` (``last`` replaced by the newest readable checkpoint when the last one is
        damaged).

        Raises:
            OutputDirError: a ``ValueError`` naming the setting and the directory.
            CheckpointError: a damaged ``--ckpt_path``, naming the newest readable checkpoint.
        """
        if self.subcommand is not None:
            for what, directory in output_dirs(self.trainer).items():
                try:
                    check_writable(directory, what)
                except ValueError as err:
                    raise OutputDirError(str(err)) from err
        connect(self.model, self.datamodule)
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not chosen
            strategy.checkpoint_io = AtomicCheckpointIO()
        if self.subcommand is not None and self._ckpt_path is not None:
            resolved = resolve_ckpt_path(self._ckpt_path, self.trainer, self.model)
            # the subcommand's arguments are read from config_init when it runs
            self.config_init[self.subcommand]["ckpt_path"] = resolved


def _checkpoint_hparams(ckpt_path: str | None) -> dict[str, Any] | None:
    """The model hyperparameters a checkpoint file stores, in the form LightningCLI merges into
    the model's config; None for no file or an unreadable one (left to :func:`resolve_ckpt_path`).

    Args:
        ckpt_path (str | None): ``--ckpt_path`` (a file, ``last``, ``best``, a URL or None).

    Returns:
        dict[str, Any] | None: ``{"class_path", "dict_kwargs"}`` or the init arguments.
    """
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    try:
        ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    except _UNREADABLE:
        return None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict):
        return None
    hparams = dict(hparams)
    hparams.pop("_instantiator", None)
    if "_class_path" in hparams:
        return {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
    return hparams


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
    """Run the Lightning CLI.

    Args:
        args (Sequence[str] | None): the command line after ``relreg``, e.g. ``["fit",
            "--config", "configs/demo/base.yaml"]``; None reads ``sys.argv``.
        run (bool): run the subcommand (else only parse and instantiate, without subcommands).

    Returns:
        RelRegCLI: the CLI, with its ``trainer``, ``model`` and ``datamodule``.
    """
    if args is None:
        return _relreg_cli(run)
    # Lightning's DDP launcher starts every other rank as a new process from sys.argv, so the
    # command line must be this command's while it runs; restored afterwards, as one process
    # (relreg demo) runs several commands.
    saved = sys.argv
    sys.argv = [saved[0], *args]
    try:
        return _relreg_cli(run)
    finally:
        sys.argv = saved


def _relreg_cli(run: bool) -> RelRegCLI:
    return RelRegCLI(
        RelRegModule,
        RelRegDataModule,
        trainer_defaults=dict(TRAINER_DEFAULTS),
        args=None,  # sys.argv, set by run_cli
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
