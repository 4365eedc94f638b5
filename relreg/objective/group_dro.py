"""The GroupDRO term: the cross-entropy of the worst groups, by online exponentiated weights.

Sagawa, Koh, Hashimoto & Liang, *Distributionally Robust Neural Networks for Group Shifts*, ICLR
2020. Read from ``loss.py`` of kohpangwei/group_DRO (``LossComputer.compute_robust_loss``, commit
e80fe20): per step, each group's mean cross-entropy ``L_g`` over its samples in the batch (0 for a
group the batch lacks), then the weights ``q`` are updated *before* they are used,
``q_g <- q_g exp(step_size (L_g + adjustment / sqrt(n_g)))`` and renormalised, and the loss is
``sum_g q_g L_g``. The weights start uniform, take no gradient, and are a buffer of the term, so
they are saved in checkpoints. Defaults as ``run_expt.py``'s: ``step_size`` 0.01, no adjustment.

Under DDP every rank must hold the same weights: the per-group loss sums and counts that update
them are gathered from all ranks with torchmetrics' ``gather_all_tensors`` and summed, so each
rank updates with the group losses of the global batch; the loss each rank differentiates is its
own batch's, weighted by the shared ``q`` (DDP then averages the gradients). Where relreg differs:
group_DRO adds the adjustment in place to the returned loss too (a constant); relreg returns
``sum_g q_g L_g`` without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from relreg.objective.context import StepContext
from relreg.objective.term import Term, register_term

__all__ = ["GroupDROTerm", "group_losses"]


def group_losses(losses: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group sums of per-sample losses and per-group counts, ``(G,)`` each."""
    sums = torch.zeros(num_groups, dtype=losses.dtype, device=losses.device)
    sums = sums.index_add(0, groups, losses)
    counts = torch.bincount(groups, minlength=num_groups).to(losses.dtype)
    return sums, counts


def _all_ranks(t: Tensor) -> Tensor:
    """``t`` summed over the ranks (torchmetrics' gather), or ``t`` outside DDP."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    from torchmetrics.utilities.distributed import gather_all_tensors

    return torch.stack(gather_all_tensors(t)).sum(0)


@register_term("group_dro")
class GroupDROTerm(Term):
    """``loss_dro``: GroupDRO's weighted group cross-entropy (see the module docstring).

    Args:
        num_groups: how many groups the training set's ``group`` ranges over (Waterbirds: 4).
        step_size: the weights' step size eta (group_DRO's ``--robust_step_size``: 0.01).
        adjustment: group_DRO's generalisation adjustment C (0: none), with ``group_counts``.
        group_counts: the training set's samples per group, for the adjustment ``C / sqrt(n_g)``.

    Replaces the classification term (``objective: [{term: group_dro, options: {num_groups:
    4}}]``), alone or beside a relevance term. Logs ``loss_dro`` and ``dro_max_weight``.
    """

    key = "loss_dro"
    needs = frozenset({"logits", "labels", "groups"})

    def __init__(
        self,
        num_groups: int,
        step_size: float = 0.01,
        adjustment: float = 0.0,
        group_counts: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"Expected num_groups to be a positive int, but got {num_groups!r}.")
        if not step_size > 0:
            raise ValueError(f"Expected step_size > 0, but got {step_size!r}.")
        if adjustment and (group_counts is None or len(group_counts) != num_groups):
            raise ValueError(
                f"Expected group_counts of the {num_groups} groups with adjustment={adjustment}, "
                f"but got {group_counts!r}."
            )
        self.num_groups = num_groups
        self.step_size = float(step_size)
        self.adjustment = float(adjustment)
        counts = torch.ones(num_groups) if group_counts is None else torch.tensor(group_counts)
        self.register_buffer("group_counts", counts.double(), persistent=False)
        self.register_buffer("weights", torch.full((num_groups,), 1.0 / num_groups))

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.key, "dro_max_weight")

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        groups = ctx.groups.long()
        if groups.numel() and (groups.min() < 0 or groups.max() >= self.num_groups):
            raise ValueError(
                f"Expected batch groups in [0, {self.num_groups}) (num_groups={self.num_groups}), "
                f"but got values up to {int(groups.max())}."
            )
        losses = F.cross_entropy(ctx.logits, ctx.labels, reduction="none")
        sums, counts = group_losses(losses, groups, self.num_groups)
        group_loss = sums / counts.clamp(min=1)  # 0 for a group the batch lacks, as group_DRO
        if ctx.training:
            global_sums = _all_ranks(sums.detach())
            global_counts = _all_ranks(counts)
            adjusted = global_sums / global_counts.clamp(min=1)
            if self.adjustment > 0:
                adjusted = adjusted + self.adjustment / self.group_counts.sqrt().to(adjusted)
            with torch.no_grad():
                weights = self.weights * torch.exp(self.step_size * adjusted.to(self.weights))
                self.weights.copy_(weights / weights.sum())
        loss = (group_loss * self.weights.to(group_loss)).sum()
        return {self.key: loss, "dro_max_weight": self.weights.max().detach().to(loss)}
