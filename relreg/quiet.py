"""Quiet command lines: the known noise of dependencies is filtered where a command starts.

``relreg fit|validate|test|predict``, ``relreg demo`` and ``relreg evaluate`` run inside
:func:`quiet_dependencies`, which hides messages that say nothing about the user's run:
deprecation notices raised inside Lightning, Lightning's advertisement for another product, its
"modules in eval mode" warning (relreg's frozen teacher for ``classification="teacher"`` is in eval
mode on purpose) and W&B's console output (``WANDB_SILENT=true`` unless the user set it: its
per-run banners and summary tables, and a warning about a setting Lightning passes; the offline
runs are written as before, under the run directory). The library itself never filters anything:
importing relreg changes no warning or logging setting.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["KNOWN_LOG_LINES", "KNOWN_WARNINGS", "quiet_dependencies"]

KNOWN_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6's pytree use on torch 2.14
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen teacher
)
"""Regular expressions of warning messages hidden at the entry points."""

KNOWN_LOG_LINES = (r"💡 Tip: ",)
"""Regular expressions of Lightning log lines hidden at the entry points."""

STAGE_LOG_LINES = (
    r"(GPU|TPU|HPU) available: ",
    r"`Trainer\(limit_(train|val|test|predict)_batches=1\.0\)` was configured",
    r"Seed set to ",
)
"""Lightning's per-run set-up lines, hidden with ``stages=True`` (a job of many short runs)."""

STAGE_WARNINGS = (r"The number of training batches \(\d+\) is smaller than the logging interval",)
"""Hints about short epochs, hidden with ``stages=True``: the demo's stages are short on purpose."""

_LIGHTNING_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning_fabric.utilities.seed",
)


class _DropLines(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


@contextmanager
def quiet_dependencies(stages: bool = False) -> Iterator[None]:
    """Hide the known dependency noise (:data:`KNOWN_WARNINGS`, :data:`KNOWN_LOG_LINES`) inside the
    block; everything is restored on exit, also after an error.

    Args:
        stages: a job of many short runs (``relreg demo``): also hide each run's set-up lines
            (:data:`STAGE_LOG_LINES`) and short-epoch hints (:data:`STAGE_WARNINGS`).
    """
    lines = KNOWN_LOG_LINES + (STAGE_LOG_LINES if stages else ())
    drop = _DropLines(lines)
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    had_silent = "WANDB_SILENT" in os.environ
    with warnings.catch_warnings():
        for pattern in KNOWN_WARNINGS + (STAGE_WARNINGS if stages else ()):
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.addFilter(drop)
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)
            if not had_silent:
                os.environ.pop("WANDB_SILENT", None)
