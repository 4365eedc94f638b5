"""``EvalSplit``: what the fine-tuning module must know of one evaluation loader.

The data module describes its evaluation loaders (:meth:`relreg.data.RelRegDataModule.eval_splits`)
and the module is told them (:meth:`relreg.lightning.RelRegModule.set_eval_splits`), explicitly,
through :func:`relreg.lightning.connect`; neither reads the other back through the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["EvalSplit", "num_groups_of"]


def num_groups_of(dataset: object) -> int | None:
    """A dataset's ``num_groups`` (read through ``torch.utils.data.Subset``), or None."""
    if dataset is None:
        return None
    if not hasattr(dataset, "num_groups") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, "num_groups", None)


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation loader, in the order the loaders come.

    Attributes:
        name: ``"id"`` for the in-distribution split (logged as ``val/...`` or ``test/...``), else
            the OOD split's name (logged as ``ood/<name>/...``).
        scoring_classes: the classes ``(C,)`` the split's predictions are restricted to
            (:func:`relreg.metrics.scoring_classes`), or None for a full argmax.
        num_groups: how many groups the split's samples fall into (their ``group``;
            :func:`num_groups_of`), or None for a split without groups.
    """

    name: str
    scoring_classes: Tensor | None = None
    num_groups: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Expected EvalSplit name a non-empty string, but got {self.name!r}.")
