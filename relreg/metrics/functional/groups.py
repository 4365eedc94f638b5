"""Group accuracies of one batch: per-group, worst-group and average-group accuracy.

The metrics of the spurious-correlation literature (Sagawa et al., *Distributionally Robust
Neural Networks for Group Shifts*, ICLR 2020, "GroupDRO"): samples fall into groups (Waterbirds:
``group = 2 * y + place``; relreg's generated benchmarks: label x the class the cue points to),
accuracy is computed within each group, and the **worst-group accuracy** is the lowest of them
over the groups that have samples (the field's headline number); the **average-group accuracy**
is their unweighted mean.

:func:`group_counts` and :func:`group_summary` are the math, :func:`group_accuracy` chains them;
:class:`relreg.metrics.GroupAccuracy` is the torchmetrics twin.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_accuracy", "group_counts", "group_summary"]


def _check(correct: Tensor, groups: Tensor, num_groups: int) -> None:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"Expected num_groups to be a positive int, but got {num_groups!r}.")
    if correct.shape != groups.shape or correct.dim() != 1:
        raise ValueError(
            f"Expected correct and groups of one shape (B,), but got {tuple(correct.shape)} and "
            f"{tuple(groups.shape)}."
        )
    if groups.numel() and (groups.min() < 0 or groups.max() >= num_groups):
        raise ValueError(
            f"Expected groups in [0, {num_groups}), but got values from {int(groups.min())} to "
            f"{int(groups.max())}."
        )


def _correct(preds: Tensor, target: Tensor) -> Tensor:
    """``(B,)`` bool: logits ``(B, K)`` or labels ``(B,)`` against ``target (B,)``."""
    if preds.dim() == 2:
        preds = preds.argmax(-1)
    if preds.shape != target.shape:
        raise ValueError(
            f"Expected preds (B,) or (B, K) matching target (B,), but got {tuple(preds.shape)} "
            f"and {tuple(target.shape)}."
        )
    return preds == target


def group_counts(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: int
) -> tuple[Tensor, Tensor]:
    """Right predictions and samples per group, ``(num_groups,)`` long each.

    Args:
        preds: ``(B, K)`` logits or ``(B,)`` predicted labels.
        target: ``(B,)`` labels (for label sets, :func:`relreg.metrics.accuracy_targets`).
        groups: ``(B,)`` group indices in ``[0, num_groups)``.
        num_groups: how many groups the dataset defines.
    """
    correct = _correct(preds, target)
    groups = groups.to(correct.device).long()
    _check(correct, groups, num_groups)
    right = torch.bincount(groups[correct], minlength=num_groups)
    total = torch.bincount(groups, minlength=num_groups)
    return right, total


def group_summary(right: Tensor, total: Tensor) -> dict[str, Tensor]:
    """Per-group, worst-group and average-group accuracy from per-group counts.

    Groups without samples have accuracy NaN and take no part in the worst and the average
    (which are NaN when no group has samples).

    Returns:
        ``{"group_accuracy": (G,), "worst_group_accuracy": (), "average_group_accuracy": ()}``.
    """
    seen = total > 0
    per_group = torch.where(seen, right.double() / total.clamp(min=1), torch.nan).float()
    present = per_group[seen]
    worst = present.min() if present.numel() else per_group.new_tensor(torch.nan)
    return {
        "group_accuracy": per_group,
        "worst_group_accuracy": worst,
        "average_group_accuracy": present.mean(),  # NaN when no group has samples
    }


def group_accuracy(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: int
) -> dict[str, Tensor]:
    """Per-group, worst-group and average-group accuracy of one batch (see :func:`group_summary`).

    Example:
        >>> preds = torch.tensor([0, 1, 1, 0])
        >>> out = group_accuracy(preds, torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 1, 1]), 3)
        >>> out["group_accuracy"], out["worst_group_accuracy"]
        (tensor([1.0000, 0.5000,    nan]), tensor(0.5000))
    """
    return group_summary(*group_counts(preds, target, groups, num_groups))
