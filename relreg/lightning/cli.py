"""``relreg fit|validate|test|predict``: LightningCLI over :class:`RelRegModule` and
:class:`RelRegDataModule`, configured by YAML files in ``configs/`` (``--print_config`` works).

Evaluation needs gradients for the relevance metrics, so the trainer defaults to
``inference_mode=False``. Loggers, callbacks and strategies are Lightning's own, chosen in the config.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from unittest import mock

from pytorch_lightning.cli import LightningCLI

from relreg.data.datamodule import RelRegDataModule
from relreg.lightning.module import RelRegModule

__all__ = ["RelRegCLI", "run_cli"]

TRAINER_DEFAULTS = {"inference_mode": False}


class RelRegCLI(LightningCLI):
    """LightningCLI with relreg's module, data module and trainer defaults."""


def run_cli(args: Sequence[str] | None = None, run: bool = True) -> RelRegCLI:
    """Run the Lightning CLI with ``args`` (e.g. ``["fit", "--config", "configs/demo/base.yaml"]``);
    None reads the command line."""
    # Given args, LightningCLI ignores sys.argv; hide it so that it does not warn about both.
    argv = sys.argv if args is None else sys.argv[:1]
    with mock.patch.object(sys, "argv", argv):
        return RelRegCLI(
            RelRegModule,
            RelRegDataModule,
            trainer_defaults=dict(TRAINER_DEFAULTS),
            args=list(args) if args is not None else None,
            run=run,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
