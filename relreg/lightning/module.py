"""``RelRegModule``: relevance-regularised fine-tuning of a timm ViT (RobustViT, Chefer, Schwartz &
Wolf, "Optimizing Relevance Maps of Vision Transformers Improves Robustness", NeurIPS 2022).

The loss is an :class:`relreg.objective.Objective`, a weighted list of registered terms; the
default is RobustViT's, ``0.8 * L_seg + 0.2 * L_cls`` with ``L_seg`` the relevance loss on the
masked samples' Chefer maps and ``L_cls`` the cross-entropy to the model's own top-1. Per step,
one forward pass gives the logits and (through the captured attention) the relevance of the
ground-truth class; an objective without a relevance term computes no maps in training (a plain
fine-tune: the control).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from relreg.data.eval_split import EvalSplit
from relreg.explain import explain_with_logits, explainer_info, find_attention_modules
from relreg.lightning.nonfinite import NonFiniteError, NonFiniteGuard, nonfinite_terms
from relreg.lightning.sharding import shard_model
from relreg.metrics import GroupAccuracy, RelevanceMass, accuracy_targets, score_logits
from relreg.models import build_model, freeze_parameters, load_weights
from relreg.objective import ROBUSTVIT, ExplainerSpec, Objective, StepContext, StepOutput
from relreg.validate import check_positive_int

try:  # LightningCLI's factory types; pytorch_lightning.cli needs jsonargparse to import
    from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
except ImportError:  # the module without the CLI (a GPU image without jsonargparse): the same types
    from collections.abc import Callable, Iterable

    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    OptimizerCallable = Callable[[Iterable], Optimizer]
    LRSchedulerCallable = Callable[[Optimizer], LRScheduler | ReduceLROnPlateau]

__all__ = ["RelRegModule"]

_EXPLAINER_KEYS = ("method", "options", "engine", "second_order", "evaluate")
_FAULT_KEYS = ("nonfinite", "max_skipped")


class RelRegModule(pl.LightningModule):
    """Fine-tune a classifier so that its relevance maps sit on the foreground.

    Args:
        model: a timm model name or an ``nn.Module``.
        pretrained: timm's pretrained weights (needs the network; see ``checkpoint`` offline).
        checkpoint: local weights file for the model (``weights_only=True``).
        num_classes: classifier size (timm names only; None keeps the model's).
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ...).
        explainer: how the maps are computed, a mapping with keys
            ``method`` (a differentiable explainer; default: the objective's relevance term's,
            else ``chefer``), ``options`` (its keyword options, e.g. ``{"gradient": "logits"}``),
            ``engine`` (``"auto"``, ``"chunked"`` or ``"dense"``, for attention explainers),
            ``second_order`` (differentiate through the attention gradients too; RobustViT:
            False) and ``evaluate`` (relevance metrics and relevance terms in validation and
            test, default True; needs ``Trainer(inference_mode=False)``).
        objective: the terms of the loss, a list of ``{term, weight, options}`` (see
            :mod:`relreg.objective`), or an :class:`~relreg.objective.Objective`; default:
            RobustViT's (:data:`relreg.objective.ROBUSTVIT`).
        optimizer: a LightningCLI optimiser factory; default ``AdamW(lr=3e-6,
            weight_decay=1e-4)`` (RobustViT's for ViT-B).
        scheduler: a LightningCLI scheduler factory, returning a scheduler (stepped every
            epoch) or Lightning's ``{"scheduler": ..., "interval": "step"}``; default
            ``StepLR(step_size=2, gamma=0.85)`` (RobustViT's).
        relevance_every: run the maps-dependent terms on every k-th training step only (the
            others are plain fine-tune steps); 1: every step, as in the paper.
        freeze: ``fnmatch`` patterns of parameter names to freeze (e.g. ``["patch_embed.*"]``).
        faults: ``{"nonfinite": "error" | "skip", "max_skipped": 3}``: stop at a non-finite loss
            or map, saying where, or skip that optimiser step (at most ``max_skipped`` in a row);
            see :mod:`relreg.lightning.nonfinite`.
    """

    def __init__(
        self,
        model: str | nn.Module = "vit_base_patch16_224",
        pretrained: bool = False,
        checkpoint: str | None = None,
        num_classes: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        explainer: dict[str, Any] | None = None,
        objective: list[dict[str, Any]] | Objective | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        relevance_every: int = 1,
        freeze: Sequence[str] = (),
        faults: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        ignore = ["optimizer", "scheduler"]
        ignore += ["model"] if isinstance(model, nn.Module) else []
        ignore += ["objective"] if isinstance(objective, Objective) else []
        self.save_hyperparameters(ignore=ignore)
        explainer = _check_keys("explainer", explainer, _EXPLAINER_KEYS)
        faults = _check_keys("faults", faults, _FAULT_KEYS)
        check_positive_int("relevance_every", relevance_every)
        self.model = _build(model, pretrained, num_classes, model_kwargs)
        if checkpoint is not None:
            load_weights(self.model, checkpoint)
        self.model.train()  # Lightning keeps modules in the mode it finds them in
        if not isinstance(objective, Objective):
            objective = Objective(list(ROBUSTVIT) if objective is None else objective, self.model)
        self.objective = objective
        self.explainer = self._explainer_spec(explainer)
        self.eval_relevance = bool(explainer.get("evaluate", True))
        self.relevance_every = relevance_every
        freeze_parameters(self.model, freeze)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.nonfinite_guard = NonFiniteGuard(
            faults.get("nonfinite", "error"), faults.get("max_skipped", 3)
        )
        self.train_acc = MulticlassAccuracy(self._num_classes(), average="micro")
        self.eval_splits: list[EvalSplit] = []
        self.set_eval_splits([EvalSplit("id")])

    # ----------------------------------------------------------------- setup
    def _explainer_spec(self, options: Mapping[str, Any]) -> ExplainerSpec:
        """The explainer of the relevance terms, checked now rather than at the first step."""
        preferred = self.objective.relevance_term()
        method = options.get("method") or getattr(preferred, "method", "chefer")
        info = explainer_info(method)
        if not info.differentiable:
            raise ValueError(
                f"Expected a differentiable explainer for explainer.method, but {method!r} is not "
                "(its maps cannot carry a loss's gradient); use e.g. 'chefer'."
            )
        method_options = dict(options.get("options") or {})
        if options.get("engine") is not None:
            method_options["engine"] = options["engine"]
        unknown = sorted(set(method_options) - set(info.options))
        if unknown:
            raise TypeError(
                f"Expected explainer options among {list(info.options)} for {method!r}, but got "
                f"unknown {unknown}."
            )
        if info.output == "grid":
            find_attention_modules(self.model)  # fail now, not at the first step
        return ExplainerSpec(
            method=method,
            options=method_options,
            second_order=bool(options.get("second_order", False)),
            normalize=getattr(preferred, "normalize", True),
        )

    def _num_classes(self) -> int:
        n = getattr(self.model, "num_classes", None)
        if not isinstance(n, int) or n < 2:
            raise ValueError(
                f"Expected a classifier with num_classes >= 2, but the model reports {n!r}."
            )
        return n

    def set_eval_splits(self, splits: Sequence[EvalSplit]) -> None:
        """Name the evaluation loaders and say how each is scored, in the loaders' order.

        :func:`relreg.lightning.connect` passes the data module's
        :meth:`~relreg.data.RelRegDataModule.eval_splits`; without it the module knows one
        in-distribution split, ``"id"``.

        Args:
            splits: one :class:`relreg.data.EvalSplit` per evaluation loader; the first named
                ``"id"`` is logged as ``val/...`` / ``test/...``, the others as ``ood/<name>/...``.

        Raises:
            TypeError: an entry is not an ``EvalSplit``.
            ValueError: no splits, or a name given twice.
        """
        splits = list(splits)
        bad = [s for s in splits if not isinstance(s, EvalSplit)]
        if bad:
            raise TypeError(f"Expected splits of relreg.data.EvalSplit, but got {bad[0]!r}.")
        names = [s.name for s in splits]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"Expected one or more distinct split names, but got {names}.")
        same = names == [s.name for s in self.eval_splits]
        self.eval_splits = splits
        groups = {str(i): GroupAccuracy(s.num_groups) for i, s in enumerate(splits) if s.num_groups}
        self.eval_groups = nn.ModuleDict(groups).to(self.device)
        if same:  # the same loaders: keep their metrics
            return
        num = self._num_classes()
        accuracies = [MulticlassAccuracy(num, average="micro") for _ in splits]
        self.eval_acc = nn.ModuleList(accuracies).to(self.device)
        self.eval_mass = nn.ModuleList([RelevanceMass() for _ in splits]).to(self.device)

    def _eval_split(self, dataloader_idx: int) -> EvalSplit:
        if dataloader_idx >= len(self.eval_splits):
            names = [s.name for s in self.eval_splits]
            raise ValueError(
                f"Expected at most {len(names)} evaluation loaders (the splits {names}), but got "
                f"loader {dataloader_idx}; call relreg.lightning.connect(module, datamodule) (the "
                "CLI does) or module.set_eval_splits(...) before the Trainer runs."
            )
        return self.eval_splits[dataloader_idx]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.nonfinite_guard.check_world_size(self.trainer.world_size)

    def configure_model(self) -> None:
        """Shard the model with FSDP2 under Lightning's ``ModelParallelStrategy`` (one unit per
        residual block, then the root: :func:`relreg.lightning.sharding.shard_model`); nothing
        under any other strategy.

        Raises:
            ValueError: for a tensor-parallel mesh (``tensor_parallel_size`` > 1: relreg's models
                are not tensor-parallel), or see :func:`relreg.lightning.sharding.check_shardable`.
        """
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy only
        if mesh is None:
            return
        names = mesh.mesh_dim_names or ()
        tp = mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
        if tp > 1:
            raise ValueError(
                "Expected ModelParallelStrategy(tensor_parallel_size=1) (FSDP over the "
                f"data-parallel dimension only), but got tensor_parallel_size={tp}."
            )
        data = mesh["data_parallel"] if "data_parallel" in names else mesh
        shard_model(self.model, data)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, K)`` of images ``(B, 3, H, W)``."""
        return self.model(images)

    # ------------------------------------------------------------------ step
    def model_step(self, batch: dict[str, Tensor], training: bool) -> StepOutput:
        """The objective's terms, the logits ``(B, K)`` and the maps of a batch.

        Args:
            batch: ``image`` ``(B, C, H, W)``, ``label`` ``(B,)``, ``mask`` ``(B, H, W)``,
                ``has_mask`` ``(B,)``.
            training: a training step: every term runs, and the maps are computed when a term
                needs them on this step (``relevance_every``). Otherwise only the terms with
                ``in_validation`` run, and the maps are computed when ``explainer.evaluate``.

        Returns:
            The step's output; ``maps`` holds the masked samples' maps in the order of
            ``masked`` (their indices in the batch).
        """
        if training:
            on_step = self.global_step % self.relevance_every == 0
            maps_on = self.objective.needs_maps and on_step
        else:
            maps_on = self.eval_relevance
        ctx = StepContext(self.model, batch, self.explainer, maps_on, training)
        return self.objective(ctx)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        out = self.model_step(batch, training=True)
        if self.nonfinite_guard.skip(self, out, batch, batch_idx):
            return None  # skipped: no backward pass, no optimiser step
        self.train_acc(out.logits.detach(), batch["label"])
        b = batch["label"].shape[0]
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=b)
        for key, value in out.terms.items():
            self.log(f"train/{key}", value.detach(), batch_size=b)
        self.log("train/acc", self.train_acc, prog_bar=True, batch_size=b)
        return out.loss

    def _eval_step(self, stage: str, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        if self.eval_relevance and torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Relevance metrics need gradients, but Lightning runs evaluation under "
                "torch.inference_mode(). Use Trainer(inference_mode=False) (relreg's CLI and "
                "configs set it) or RelRegModule(explainer={'evaluate': False})."
            )
        split = self._eval_split(dataloader_idx)
        name = split.name
        prefix = stage if name == "id" else f"ood/{name}"
        out = self.model_step(batch, training=False)
        if "relevance" in nonfinite_terms(out):
            raise NonFiniteError(f"Non-finite relevance in {stage} (batch of {name!r}).")
        logits = score_logits(out.logits.detach(), split.scoring_classes)
        b = batch["label"].shape[0]
        self.eval_acc[dataloader_idx](logits, accuracy_targets(logits, batch))
        # metric_attribute: the metrics are made per evaluation split at setup, after Lightning
        # has indexed the module's metric attributes
        self.log(
            f"{prefix}/acc",
            self.eval_acc[dataloader_idx],
            batch_size=b,
            add_dataloader_idx=False,
            metric_attribute=f"eval_acc.{dataloader_idx}",
        )
        if str(dataloader_idx) in self.eval_groups and "group" in batch:
            targets = accuracy_targets(logits, batch)
            self.eval_groups[str(dataloader_idx)].update(logits, targets, batch["group"])
        if name == "id":
            losses = {"loss": out.loss, **out.terms}
            for key, value in losses.items():
                self.log(  # sync_dist: under DDP the mean over all ranks, not rank 0's
                    f"{prefix}/{key}",
                    value.detach(),
                    batch_size=b,
                    add_dataloader_idx=False,
                    sync_dist=True,
                )
        if out.maps is not None:
            masks = batch["mask"][out.masked]
            self.eval_mass[dataloader_idx].update(out.maps.detach(), masks)
            self.log(
                f"{prefix}/relevance_mass",
                self.eval_mass[dataloader_idx],
                batch_size=b,
                add_dataloader_idx=False,
                metric_attribute=f"eval_mass.{dataloader_idx}",
            )

    def validation_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def _log_groups(self, stage: str) -> None:
        """``<prefix>/worst_group_acc`` and ``average_group_acc`` of every split with groups
        (:class:`relreg.metrics.GroupAccuracy`: per-group counts summed over the ranks)."""
        for index, metric in self.eval_groups.items():
            name = self.eval_splits[int(index)].name
            prefix = stage if name == "id" else f"ood/{name}"
            if metric.update_called:  # compute() sums the counts over the ranks
                result = metric.compute()
                if not torch.isnan(result["worst_group_accuracy"]):
                    for key in ("worst_group", "average_group"):
                        value = result[f"{key}_accuracy"].to(self.device)
                        self.log(f"{prefix}/{key}_acc", value, sync_dist=True)
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_groups("val")

    def on_test_epoch_end(self) -> None:
        self._log_groups("test")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def predict_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """Logits ``(B, K)`` and raw maps of the top-1 class for a batch."""
        spec = self.explainer
        with torch.enable_grad():
            exp = explain_with_logits(self.model, batch["image"], spec.method, **spec.options)
        return {"logits": exp.logits, "maps": exp.maps}

    # ------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("Expected some trainable parameters, but every parameter is frozen.")
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.AdamW(params, lr=3e-6, weight_decay=1e-4)
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.85)
        if not isinstance(scheduler, Mapping):
            scheduler = {"scheduler": scheduler, "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": dict(scheduler)}


def _build(
    model: str | nn.Module,
    pretrained: bool,
    num_classes: int | None,
    model_kwargs: dict[str, Any] | None,
) -> nn.Module:
    if isinstance(model, str):
        return build_model(model, pretrained, None, num_classes, **(model_kwargs or {}))
    if isinstance(model, nn.Module):
        return model
    raise TypeError(
        f"Expected model a timm model name or an nn.Module, but got {type(model).__name__}."
    )


def _check_keys(name: str, value: Mapping[str, Any] | None, keys: tuple[str, ...]) -> dict:
    """A settings mapping with known keys only (``{}`` for None)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"Expected {name} a mapping with keys {keys}, but got {value!r}.")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ValueError(f"Expected {name} keys among {keys}, but got unknown {unknown}.")
    return dict(value)
