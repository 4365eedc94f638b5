"""Lightning callbacks that track explanation quality while a model trains.

- :class:`RelevanceHeatmapLogger`: a fixed set of validation images, their masks and relevance
  overlays, logged as a figure every N epochs through the active logger (W&B ``log_image`` plus a
  ``wandb.Table`` of per-image metrics, TensorBoard ``add_image``, or PNG files in the run
  directory for loggers that hold no images).
- :class:`ExplanationQuality`: the metrics declared for the callback
  (:func:`relreg.metrics.list_metrics` ``("callback")``) on a bounded validation subset every N
  epochs, logged as ``val/xai/<key>``.
- :class:`OODEvaluation`: accuracy on named out-of-distribution datasets every N epochs, logged as
  ``ood/<name>/acc`` and ``ood/mean_acc`` (a valid ``ModelCheckpoint`` monitor).

Both skip the sanity check, work with ``inference_mode`` on or off (gradients are enabled
locally), keep their state in ``state_dict`` so a resumed run continues with the same images, and
cost nothing on the epochs they skip. Media are logged on rank zero only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from relreg.data.classes import dataset_label_names
from relreg.explain import explain_with_logits, to_pixels
from relreg.metrics import (
    dataset_scores,
    keyed_result,
    list_metrics,
    metric_spec,
    relevance_share,
)
from relreg.validate import check_positive_int
from relreg.viz import explanation_grid, save_figure

__all__ = ["ExplanationQuality", "OODEvaluation", "RelevanceHeatmapLogger"]


def _val_loader(trainer: pl.Trainer, dataloader_idx: int) -> DataLoader:
    loaders = trainer.val_dataloaders
    return loaders[dataloader_idx] if isinstance(loaders, list | tuple) else loaders


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode for the block, its previous mode restored after (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class _KeepsLast(pl.Callback):
    """Keeps the last logged values in ``self.last`` and in the checkpoint."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = dict(state_dict["last"])


def _explain(pl_module: pl.LightningModule, images: Tensor, labels: Tensor, method: str):
    """Maps and logits with gradients enabled, whatever the trainer's inference mode."""
    with _eval_mode(pl_module.model) as model, torch.inference_mode(False), torch.enable_grad():
        return explain_with_logits(model, images.clone(), method, target=labels)


def _display_norm(dataset: Dataset, mean: object, std: object) -> tuple[Tensor, Tensor]:
    """``(1, 3, 1, 1)`` mean and std that undo the dataset's normalisation for display."""
    pre = getattr(dataset, "preprocessing", None)
    mean = getattr(pre, "mean", 0.5) if mean is None else mean
    std = getattr(pre, "std", 0.5) if std is None else std
    return tuple(torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (mean, std))


def _due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    return not trainer.sanity_checking and (trainer.current_epoch + 1) % every_n_epochs == 0


class RelevanceHeatmapLogger(pl.Callback):
    """Log relevance overlays of a fixed set of validation images.

    Args:
        num_images: how many images (at most 49).
        every_n_epochs: log on every N-th validation epoch.
        method: explainer name (default ``chefer``).
        dataloader_idx: which validation loader to draw the images from.
        seed: seed of the choice of images.
        mean, std: to undo the input normalisation for display; None: the dataset's own
            (:attr:`relreg.data.FollowsModel.preprocessing`), else 0.5 (RobustViT).
        per_group: choose the images round-robin over the dataset's groups (``dataset.groups``:
            Waterbirds, SpuriousShapes), so that the minority groups are shown too.

    Captions name the predicted and true classes (timm's ImageNet names for a 1000-class model,
    else the dataset's class names; :func:`relreg.data.dataset_label_names`).
    """

    def __init__(
        self,
        num_images: int = 8,
        every_n_epochs: int = 1,
        method: str = "chefer",
        dataloader_idx: int = 0,
        seed: int = 0,
        mean: float | list[float] | None = None,
        std: float | list[float] | None = None,
        per_group: bool = False,
    ) -> None:
        if not 1 <= num_images < 50:
            raise ValueError(f"Expected num_images in [1, 49], but got {num_images!r}.")
        check_positive_int("every_n_epochs", every_n_epochs)
        self.num_images, self.every_n_epochs, self.method = num_images, every_n_epochs, method
        self.dataloader_idx, self.seed, self.mean, self.std = dataloader_idx, seed, mean, std
        self.per_group = per_group
        self.indices: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"indices": list(self.indices)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.indices = list(state_dict["indices"])

    def _choose(self, trainer: pl.Trainer) -> None:
        if self.indices:
            return
        dataset = _val_loader(trainer, self.dataloader_idx).dataset
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(dataset), generator=g)
        groups = getattr(dataset, "groups", None) if self.per_group else None
        if groups is None:
            self.indices = sorted(order[: self.num_images].tolist())
            return
        if len(groups) != len(dataset):
            raise ValueError(
                f"Expected one group per validation image for per_group=True, but the dataset "
                f"has {len(dataset)} images and {len(groups)} groups."
            )
        of_image = torch.as_tensor(groups)[order]
        queues = [order[of_image == k].tolist() for k in of_image.unique().tolist()]
        chosen: list[int] = []
        while len(chosen) < self.num_images and any(queues):
            for queue in queues:  # one image of each group in turn
                if queue and len(chosen) < self.num_images:
                    chosen.append(queue.pop(0))
        self.indices = sorted(chosen)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _due(trainer, self.every_n_epochs) or not trainer.is_global_zero:
            return
        self._choose(trainer)
        dataset = _val_loader(trainer, self.dataloader_idx).dataset
        samples = [dataset[i] for i in self.indices]
        images = torch.stack([s["image"] for s in samples]).to(pl_module.device)
        labels = torch.stack([torch.as_tensor(s["label"]) for s in samples]).to(pl_module.device)
        masks = torch.stack([s["mask"] for s in samples]).to(pl_module.device)
        has = torch.stack([torch.as_tensor(s["has_mask"]) for s in samples]).bool()
        exp = _explain(pl_module, images, labels, self.method)
        pix = to_pixels(exp.maps.detach(), size=images.shape[-2:]).cpu()
        mass = relevance_share(exp.maps.detach(), masks).cpu()
        preds = exp.logits.argmax(1).cpu()
        names = dataset_label_names(dataset, exp.logits.shape[1])
        captions = [
            f"#{i} pred {names[int(p)][:18]} label {names[int(y)][:18]}"
            + (f" mass {float(m):.2f}" if h else "")
            for i, p, y, m, h in zip(self.indices, preds, labels.cpu(), mass, has, strict=True)
        ]
        mean, std = _display_norm(dataset, self.mean, self.std)
        shown = (images.detach().cpu() * std + mean).clamp(0, 1)
        outlined = shown.clone()
        edge = _outline(masks.cpu()) & has.view(-1, 1, 1)
        outlined[:, 0][edge], outlined[:, 1][edge], outlined[:, 2][edge] = 1.0, 1.0, 0.0
        figure = explanation_grid(
            outlined, {f"{self.method} (epoch {trainer.current_epoch})": pix}, captions
        )
        self._log(trainer, figure, captions, preds, labels.cpu(), mass, has)

    def _log(self, trainer, figure, captions, preds, labels, mass, has) -> None:
        key = "val/xai/heatmaps"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_image(
                    key=key, images=[_to_array(figure)], caption=[f"epoch {trainer.current_epoch}"]
                )
                rows = [
                    [c, int(p), int(y), float(m) if h else None]
                    for c, p, y, m, h in zip(captions, preds, labels, mass, has, strict=True)
                ]
                logger.experiment.log(
                    {
                        f"{key}_table": wandb.Table(
                            columns=["image", "pred", "label", "relevance_mass"], data=rows
                        )
                    }
                )
                return
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    key, _to_array(figure), trainer.global_step, dataformats="HWC"
                )
                return
        # the logger's own log_dir: trainer.log_dir broadcasts, and this runs on rank zero only
        logger = trainer.logger
        log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        root = Path(log_dir or trainer.default_root_dir) / "heatmaps"
        save_figure(figure, root / f"epoch{trainer.current_epoch:04d}.png")


def _outline(masks: Tensor) -> Tensor:
    """Boolean ``(B, H, W)`` boundary pixels of binary masks."""
    m = masks.bool()
    inner = m.clone()
    inner[:, 1:-1, 1:-1] = (
        m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]
    )
    return m & ~inner


def _to_array(figure) -> np.ndarray:
    """RGB array ``(H, W, 3)`` of a matplotlib figure (closes it)."""
    import matplotlib.pyplot as plt

    figure.canvas.draw()
    array = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return array


class ExplanationQuality(_KeepsLast):
    """Explanation metrics on a bounded validation subset, as ``val/xai/<key>``.

    Logs the metrics declared for the callback (:func:`relreg.metrics.list_metrics`
    ``("callback")``: relevance mass, relevance rank accuracy, pointing game, segmentation mIoU /
    pixel accuracy / mAP, top-k intersection, localization AUC, sparseness, complexity, effective
    complexity, and any metric registered with ``used_by=("callback", ...)``), or the registered
    metrics named in ``metrics``. ``metric_every`` is the cost guard: an expensive metric
    (deletion, insertion: a forward pass per step and image) runs on every N-th evaluation only.
    The catalogue, with each metric's cost: docs/guide/evaluation.md.

    Args:
        num_batches: validation batches to explain (from the start of the loader).
        every_n_epochs: evaluate on every N-th validation epoch.
        method: explainer name.
        dataloader_idx: which validation loader.
        metrics: names of registered metrics (:func:`relreg.metrics.list_metrics`); None: those
            declared for the callback.
        metric_every: ``{name: N}``: compute that metric on every N-th of this callback's
            evaluations (at epochs ``every_n_epochs * N``, ``2 * every_n_epochs * N``, ...);
            the others run on every one.

    Example:
        >>> quality = ExplanationQuality(
        ...     metrics=["relevance_mass", "sparseness", "deletion"], metric_every={"deletion": 5}
        ... )
    """

    def __init__(
        self,
        num_batches: int = 2,
        every_n_epochs: int = 1,
        method: str = "chefer",
        dataloader_idx: int = 0,
        metrics: Sequence[str] | None = None,
        metric_every: Mapping[str, int] | None = None,
    ) -> None:
        check_positive_int("num_batches", num_batches)
        check_positive_int("every_n_epochs", every_n_epochs)
        self.num_batches, self.every_n_epochs = num_batches, every_n_epochs
        self.method, self.dataloader_idx = method, dataloader_idx
        self.metrics = _metric_names(metrics)
        self.metric_every = _metric_every(metric_every, self.metrics)
        super().__init__()

    def _due_metrics(self, trainer: pl.Trainer) -> list[str]:
        evaluation = (trainer.current_epoch + 1) // self.every_n_epochs  # 1, 2, ...
        return [n for n in self.metrics if evaluation % self.metric_every.get(n, 1) == 0]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _due(trainer, self.every_n_epochs):
            return
        names = self._due_metrics(trainer)
        loader = _val_loader(trainer, self.dataloader_idx)
        context = {
            "model": pl_module.model,
            "unit": "pixel",
            "target_mode": "label",  # the maps explain the labels
            "steps": 10,
            "method": self.method,
        }
        metrics = {n: metric_spec(n).build(**context).to(pl_module.device) for n in names}
        inputs_of = {name: metric_spec(name).inputs for name in metrics}
        for i, batch in enumerate(loader):
            if i >= self.num_batches:
                break
            has = batch["has_mask"].bool()
            if not has.any():
                continue
            images, labels = (
                batch["image"][has].to(pl_module.device),
                batch["label"][has].to(pl_module.device),
            )
            maps = _explain(pl_module, images, labels, self.method).maps.detach()
            masks = batch["mask"][has].to(pl_module.device)
            pixels = to_pixels(maps, size=images.shape[-2:], normalize=False)
            args_of = {"masks": (maps, masks), "model": (images, maps, labels), "maps": (pixels,)}
            with _eval_mode(pl_module.model):
                for name, inputs in inputs_of.items():
                    metrics[name].update(*args_of[inputs])
        values: dict[str, float] = {}
        for name, metric in metrics.items():
            result = metric.compute()  # syncs across processes under DDP
            for key, value in keyed_result(name, result).items():
                values[key] = float(value)
        self.last = values
        for key, value in values.items():
            pl_module.log(f"val/xai/{key}", value)  # the same value on every rank: already synced


def _metric_names(metrics: Sequence[str] | None) -> list[str]:
    """The callback's metric names: registered, each once."""
    if metrics is None:
        return list_metrics("callback")
    if isinstance(metrics, str) or not all(isinstance(n, str) for n in metrics):
        raise TypeError(f"Expected metrics a list of metric names or None, but got {metrics!r}.")
    names = list(metrics)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"Expected metrics a non-empty list of distinct names, but got {names}.")
    for name in names:
        metric_spec(name)  # a ValueError naming the registered metrics
    return names


def _metric_every(every: Mapping[str, int] | None, names: list[str]) -> dict[str, int]:
    if every is None:
        return {}
    if not isinstance(every, Mapping):
        raise TypeError(f"Expected metric_every a dict of name: N or None, but got {every!r}.")
    unknown = sorted(set(every) - set(names))
    if unknown:
        raise ValueError(
            f"Expected metric_every's names among the callback's metrics {names}, but got "
            f"{unknown}."
        )
    for name, n in every.items():
        check_positive_int(f"metric_every[{name!r}]", n)
    return dict(every)


class OODEvaluation(_KeepsLast):
    """Accuracy on named OOD datasets, logged as ``ood/<name>/acc`` and their mean ``ood/mean_acc``;
    for datasets with groups also ``ood/<name>/worst_group_acc`` and ``average_group_acc``.

    For splits that are not already validation loaders of the data module (those are logged by
    :class:`RelRegModule` itself under the same keys). Each split is scored under its own
    convention (:func:`relreg.metrics.dataset_scores`: full argmax, restricted, label sets).

    Args:
        datasets: ``{name: dataset}`` yielding :class:`relreg.data.Sample` dicts.
        every_n_epochs: evaluate on every N-th validation epoch.
        batch_size: evaluation batch size.
    """

    def __init__(
        self, datasets: dict[str, Dataset], every_n_epochs: int = 1, batch_size: int = 64
    ) -> None:
        if not datasets:
            raise ValueError("Expected at least one OOD dataset, but got none.")
        check_positive_int("every_n_epochs", every_n_epochs)
        check_positive_int("batch_size", batch_size)
        self.datasets, self.every_n_epochs, self.batch_size = (
            dict(datasets),
            every_n_epochs,
            batch_size,
        )
        super().__init__()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _due(trainer, self.every_n_epochs):
            return
        values: dict[str, float] = {}
        scores: dict[str, dict[str, float]] = {}
        with _eval_mode(pl_module.model) as model:
            for name, dataset in self.datasets.items():
                # torchmetrics' metrics: synced across processes under DDP
                scores[name] = dataset_scores(model, dataset, self.batch_size, pl_module.device)
                values[name] = scores[name]["acc"]
        self.last = values
        for name, found in scores.items():
            for key, value in found.items():
                pl_module.log(f"ood/{name}/{key}", value)
        pl_module.log("ood/mean_acc", sum(values.values()) / len(values))
