"""Localization metrics as torchmetrics: agreement of relevance maps with foreground masks.

``RelevanceMass``: mean fraction of relevance inside the mask (Arras, Osman & Samek, Information
Fusion 2022). States are sums, so DDP synchronisation is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from relreg.metrics.functional import _relevance_mass_update

__all__ = ["RelevanceMass"]


class RelevanceMass(Metric):
    """Mean over images of the fraction of relevance inside the mask.

    ``update(maps, masks, has_mask=None)`` with maps ``(B, h, w)`` or ``(B, H, W)`` and masks
    ``(B, H, W)``; images whose ``has_mask`` is False are skipped. ``compute()`` is a fraction in
    [0, 1] (NaN-free: 0 before any masked image).

    Example:
        >>> import torch
        >>> metric = RelevanceMass()
        >>> metric.update(torch.rand(4, 7, 7), (torch.rand(4, 28, 28) > 0.5).float())
        >>> 0.0 <= metric.compute().item() <= 1.0
        True
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor, has_mask: Tensor | None = None) -> None:
        fractions = _relevance_mass_update(maps, masks)
        if has_mask is not None:
            fractions = fractions[has_mask.to(fractions.device)]
        self.total += fractions.double().sum()
        self.count += fractions.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp_min(1)).float()
