"""Explanation-quality metrics: functional twins and torchmetrics ``Metric`` classes."""

from relreg.metrics.functional import relevance_mass
from relreg.metrics.localization import RelevanceMass

__all__ = ["RelevanceMass", "relevance_mass"]
