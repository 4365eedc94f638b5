"""Group accuracies over a split as a torchmetrics ``Metric``: per-group, worst-group and
average-group accuracy (Sagawa et al., ICLR 2020, "GroupDRO"; the math and the definitions are in
:mod:`relreg.metrics.functional.groups`).

The per-group counts are summed states (``dist_reduce_fx="sum"``), so the result under DDP is
exactly the result over all the data: each rank adds its counts, ``compute`` divides once.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from relreg.metrics.functional.groups import _check, group_counts, group_summary

__all__ = ["GroupAccuracy"]


class GroupAccuracy(Metric):
    """Per-group, worst-group and average-group accuracy over a whole split, exact under DDP.

    Args:
        num_groups: how many groups the dataset defines.

    ``update(preds, target, groups)`` takes ``(B, K)`` logits or ``(B,)`` labels, ``(B,)`` labels
    and ``(B,)`` groups; ``compute()`` returns :func:`group_summary`'s dict.

    Example:
        >>> metric = GroupAccuracy(num_groups=2)
        >>> metric.update(torch.tensor([1, 1]), torch.tensor([1, 0]), torch.tensor([0, 1]))
        >>> metric.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))
        >>> metric.compute()["worst_group_accuracy"]
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_groups: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        _check(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long), num_groups)
        self.num_groups = num_groups
        self.add_state("right", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        right, total = group_counts(preds, target, groups, self.num_groups)
        self.right += right.to(self.right.device)
        self.total += total.to(self.total.device)

    def compute(self) -> dict[str, Tensor]:
        return group_summary(self.right, self.total)
