"""Complexity metrics as torchmetrics ``Metric``s: how concentrated relevance maps are.

``update(maps)`` with maps ``(B, ...)``, raw (each metric divides by the map's largest absolute
value itself). States are sums (``dist_reduce_fx="sum"``), so the result under DDP is exactly the
result over all the data. The math and the papers are in
:mod:`relreg.metrics.functional.complexity`, with the functional twins.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from relreg.metrics.functional.complexity import (
    _complexity_update,
    _effective_complexity_update,
    _sparseness_update,
)
from relreg.validate import check_positive_float

__all__ = ["Complexity", "EffectiveComplexity", "Sparseness"]


class _MapMean(Metric):
    """Mean over maps of a per-map score; maps scored NaN (no score defined) are left out."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_map(self, maps: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, maps: Tensor) -> None:
        """Add a batch of maps ``(B, ...)``."""
        scores = self._per_map(maps)
        scores = scores[torch.isfinite(scores)]
        self.total += scores.double().sum()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        """The mean (NaN before any scored map)."""
        if not int(self.count):
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()


class Sparseness(_MapMean):
    """Gini index of the maps' absolute values, averaged (Chalasani et al., ICML 2020; Quantus'
    ``Sparseness``): in [0, 1), higher is sparser.

    Example:
        >>> import torch
        >>> metric = Sparseness()
        >>> metric.update(torch.ones(2, 4, 4))
        >>> metric.compute() < 1e-6
        tensor(True)
    """

    higher_is_better = True

    def _per_map(self, maps: Tensor) -> Tensor:
        return _sparseness_update(maps)


class Complexity(_MapMean):
    """Entropy of the fractions of absolute relevance, averaged (Bhatt et al., IJCAI 2020;
    Quantus' ``Complexity``): in [0, log n], lower is simpler. All-zero maps are left out.

    Example:
        >>> import torch
        >>> round(Complexity()(torch.ones(2, 4, 4)).item(), 4)  # log(16)
        2.7726
    """

    higher_is_better = False

    def _per_map(self, maps: Tensor) -> Tensor:
        return _complexity_update(maps)


class EffectiveComplexity(_MapMean):
    """Number of values with ``|a| / max|a| > eps``, averaged (Nguyen & Martínez 2020; Quantus'
    ``EffectiveComplexity``): lower is simpler; a count of pixels, so it grows with the image.

    Args:
        eps: the threshold on the normalised absolute values.
        **kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import torch
        >>> EffectiveComplexity()(torch.tensor([[[0.0, 1.0], [1e-7, 0.5]]]))
        tensor(2.)
    """

    higher_is_better = False

    def __init__(self, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive_float("eps", eps)
        self.eps = float(eps)

    def _per_map(self, maps: Tensor) -> Tensor:
        return _effective_complexity_update(maps, self.eps)
