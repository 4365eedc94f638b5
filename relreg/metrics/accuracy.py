"""Top-1 accuracy of classifiers on evaluation splits, under the split's scoring convention.

- ``scoring="argmax"``: the argmax over all the model's classes (RobustViT's convention for
  ImageNet-A/R/Sketch: 1000-way top-1);
- ``scoring="restricted"``: the argmax over the split's own classes only (:func:`restrict_logits`,
  the common ImageNet-A/R protocol of Hendrycks et al.);
- label sets: a split whose classes each stand for several model classes (ObjectNet) counts a
  prediction of any of them as right (:func:`accuracy_targets`).

:func:`scoring_classes` reads a dataset's convention and :func:`score_logits` applies it;
``RelRegModule``, the ``OODEvaluation`` callback and ``relreg evaluate`` all score through them.
:func:`dataset_accuracy` is the one loop over a whole split (``OODEvaluation`` and the OOD splits
of ``relreg evaluate``), with torchmetrics' ``MulticlassAccuracy`` (summed states: exact under
DDP; the result is float32).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

__all__ = [
    "SCORINGS",
    "accuracy_targets",
    "dataset_accuracy",
    "dataset_scores",
    "restrict_logits",
    "score_logits",
    "scoring_classes",
]

SCORINGS = ("argmax", "restricted")


def accuracy_targets(logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Labels ``(B,)`` against which top-1 accuracy of ``logits (B, K)`` is right.

    For samples with a ``label_set`` (an OOD folder standing for several model classes, as in
    ObjectNet), the prediction itself when it is one of them, else the first of them; otherwise
    ``batch["label"]``. Feed the result to any accuracy metric (torchmetrics'
    ``MulticlassAccuracy``).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[0.0, 2.0, 1.0]])
        >>> batch = {"label": torch.tensor([2]), "label_set": torch.tensor([[2, 1]])}
        >>> accuracy_targets(logits, batch)
        tensor([1])
    """
    labels = batch["label"].to(logits.device)
    sets = batch.get("label_set")
    if sets is None:
        return labels
    preds = logits.argmax(-1)
    hit = (sets.to(logits.device) == preds[:, None]).any(dim=1)
    return torch.where(hit, preds, labels)


def restrict_logits(logits: Tensor, classes: Tensor) -> Tensor:
    """Logits ``(B, K)`` with every class outside ``classes`` ``(C,)`` set to -inf.

    An argmax of the result is restricted scoring: over the split's own classes only.
    """
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[classes.to(logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


def scoring_classes(dataset: object) -> Tensor | None:
    """The classes ``(C,)`` a dataset's predictions are restricted to, or None for a full argmax.

    A dataset opts into restricted scoring with ``scoring == "restricted"`` and a
    ``split_classes`` tensor (:class:`relreg.data.OODImageFolder`); any other dataset is scored
    with a full argmax. A wrapper without ``scoring`` (``torch.utils.data.Subset``) is read
    through its ``dataset``.
    """
    if not hasattr(dataset, "scoring") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if getattr(dataset, "scoring", "argmax") == "restricted":
        return dataset.split_classes
    return None


def score_logits(logits: Tensor, classes: Tensor | None) -> Tensor:
    """``logits (B, K)`` restricted to ``classes`` (:func:`scoring_classes`); unchanged for None."""
    return logits if classes is None else restrict_logits(logits, classes)


def dataset_scores(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    on_batch: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on ``dataset`` under the dataset's scoring convention, and its
    group accuracies where the dataset has groups.

    Args:
        model: the classifier, called under ``torch.no_grad`` (its mode is left as it is).
        dataset: yields :class:`relreg.data.Sample` dicts (``image``, ``label``, optional
            ``label_set`` and ``group``; ``dataset.num_groups`` says how many groups there are).
        batch_size: images per forward pass.
        device: where to run (default: the model's device).
        on_batch: called after every batch (e.g. a progress bar's ``update``).

    Returns:
        ``{"acc"}``, plus ``"worst_group_acc"`` and ``"average_group_acc"`` for a dataset with
        groups (:class:`relreg.metrics.GroupAccuracy`); synced across processes under DDP.
    """
    from relreg.metrics.groups import GroupAccuracy

    device = torch.device(device) if device is not None else next(model.parameters()).device
    classes = scoring_classes(dataset)
    inner = getattr(dataset, "dataset", dataset)
    num_groups = getattr(dataset, "num_groups", None) or getattr(inner, "num_groups", None)
    groups = GroupAccuracy(num_groups).to(device) if num_groups else None
    accuracy = None  # sized by the first batch's logits: any classifier, not only timm's
    for batch in DataLoader(dataset, batch_size=batch_size):
        with torch.no_grad():
            logits = score_logits(model(batch["image"].to(device)), classes)
        if accuracy is None:
            accuracy = MulticlassAccuracy(logits.shape[-1], average="micro").to(device)
        targets = accuracy_targets(logits, batch)
        accuracy.update(logits, targets)
        if groups is not None and "group" in batch:
            groups.update(logits, targets, batch["group"].to(device))
        if on_batch is not None:
            on_batch()
    out = {"acc": 0.0 if accuracy is None else float(accuracy.compute())}
    if groups is not None and groups.update_called:
        result = groups.compute()
        out["worst_group_acc"] = float(result["worst_group_accuracy"])
        out["average_group_acc"] = float(result["average_group_accuracy"])
    return out


def dataset_accuracy(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    on_batch: Callable[[], object] | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` under the dataset's scoring convention
    (:func:`dataset_scores`' ``"acc"``); synced across processes under DDP."""
    return dataset_scores(model, dataset, batch_size, device, on_batch)["acc"]
