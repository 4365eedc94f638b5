"""Lightning integration: the fine-tuning module and the LightningCLI entry point."""

from relreg.lightning.callbacks import ExplanationQuality, OODEvaluation, RelevanceHeatmapLogger
from relreg.lightning.module import RelRegModule

__all__ = ["ExplanationQuality", "OODEvaluation", "RelRegModule", "RelevanceHeatmapLogger"]
