"""Baselines of the spurious-correlation field that are stages rather than loss terms: DFR
(last-layer retraining on a group-balanced held-out set). GroupDRO is an objective term
(:class:`relreg.objective.GroupDROTerm`)."""

from relreg.baselines.dfr import C_GRID, DFRResult, deep_feature_reweighting, embed
from relreg.baselines.stage import run_dfr

__all__ = ["C_GRID", "DFRResult", "deep_feature_reweighting", "embed", "run_dfr"]
