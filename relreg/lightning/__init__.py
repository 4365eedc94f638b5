"""Lightning integration: the fine-tuning module, callbacks, fault handling and the LightningCLI
entry point."""

from relreg.lightning.callbacks import ExplanationQuality, OODEvaluation, RelevanceHeatmapLogger
from relreg.lightning.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from relreg.lightning.connect import connect
from relreg.lightning.module import RelRegModule
from relreg.lightning.nonfinite import NonFiniteError
from relreg.lightning.resume import CheckpointError, check_checkpoint, resolve_ckpt_path

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "CheckpointWriteError",
    "ExplanationQuality",
    "NonFiniteError",
    "OODEvaluation",
    "RelRegModule",
    "RelevanceHeatmapLogger",
    "check_checkpoint",
    "connect",
    "resolve_ckpt_path",
]
