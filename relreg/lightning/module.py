"""``RelRegModule``: relevance-regularised fine-tuning of a timm ViT (RobustViT, Chefer, Schwartz &
Wolf, "Optimizing Relevance Maps of Vision Transformers Improves Robustness", NeurIPS 2022).

Per step, one forward pass gives the logits and (through the captured attention) the relevance of
the ground-truth class; the loss is ``lambda_seg * L_seg + lambda_cls * L_cls`` (paper: 0.8 and 0.2)
with ``L_seg`` a relevance loss on the masked samples and ``L_cls`` the classification term
(paper: cross-entropy to the model's own top-1, ``classification="self"``). With
``lambda_seg=0`` (and ``lambda_faith=0``) it is a plain fine-tune (no relevance is computed): the
control. ``lambda_cf > 0``
adds a background-counterfactual term in training (:mod:`relreg.losses.counterfactual`): the
masked samples' prediction must not change when their background is swapped for another's;
``lambda_faith > 0`` ties the maps to the decision (:mod:`relreg.losses.faithful`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from relreg.explain import explain_with_logits, explainer_info, find_attention_modules, to_pixels
from relreg.lightning.nonfinite import NonFiniteError, NonFiniteGuard, nonfinite_terms
from relreg.losses import (
    ClassificationLoss,
    background_effect_share,
    counterfactual_loss,
    create_relevance_loss,
    faithfulness_loss,
    swap_backgrounds,
)
from relreg.metrics import RelevanceMass, accuracy_targets, score_logits, scoring_classes
from relreg.models import build_model, freeze_parameters, load_weights
from relreg.validate import check_positive_int

__all__ = ["RelRegModule"]


class RelRegModule(pl.LightningModule):
    """Fine-tune a classifier so that its relevance maps sit on the foreground.

    Args:
        model: a timm model name or an ``nn.Module``.
        pretrained: timm's pretrained weights (needs the network; see ``checkpoint`` offline).
        checkpoint: local weights file for the model (``weights_only=True``).
        num_classes: classifier size (timm names only; None keeps the model's).
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ...).
        method: explainer whose maps the loss shapes (default: the loss's own, ``chefer``).
        method_options: keyword options of that explainer, e.g. ``{"gradient": "logits"}`` for
            ``chefer`` (see :func:`relreg.explain.chefer`); used in training and validation.
        second_order: differentiate through the attention gradients too (RobustViT: False).
        relevance_loss: a registered name (``"robustvit"``, ``"mass"``, ``"rrr"``; see
            :func:`relreg.losses.list_relevance_losses`) or a loss module.
        relevance_loss_options: keyword options of a named relevance loss, e.g.
            ``{"lambda_bg": 2.0, "lambda_fg": 0.3}`` for ``robustvit`` (the paper's, and the
            defaults).
        lambda_seg, lambda_cls: weights of the relevance and classification terms (paper: 0.8, 0.2).
        classification: ``"self"`` (paper), ``"label"`` or ``"teacher"`` (KL to a frozen copy).
        temperature: of the classification term (paper: 1; DeiT-B 0.65, DeiT-S 0.55).
        freeze: ``fnmatch`` patterns of parameter names to freeze (e.g. ``["patch_embed.*"]``).
        lr, weight_decay: AdamW defaults (paper: lr 3e-6 for ViT-B, weight decay 1e-4).
        lr_step_epochs, lr_gamma: StepLR defaults (paper: x0.85 every 2 epochs).
        optimizer, scheduler: LightningCLI-injected factories that replace the defaults.
        eval_relevance: compute relevance metrics and the relevance loss in validation/test
            (needs gradients: ``Trainer(inference_mode=False)``).
        relevance_every: compute the relevance loss on every k-th training step only (the other
            steps are plain fine-tune steps); 1: every step, as in the paper.
        lambda_cf: weight of the background-counterfactual consistency term (training only; one
            more forward pass over the masked samples); 0: off, as in the paper.
        lambda_faith: weight of the faithfulness anchor (training only; two more forward passes
            over the masked samples): the background's measured effect share may not exceed the
            map's background share (:mod:`relreg.losses.faithful`); 0: off.
        nonfinite: ``"error"`` (stop at a non-finite loss or relevance map, saying where) or
            ``"skip"`` (skip that optimiser step); see :mod:`relreg.lightning.nonfinite`.
        max_skipped: with ``"skip"``, stop after this many skipped steps in a row.
    """

    def __init__(
        self,
        model: str | nn.Module = "vit_base_patch16_224",
        pretrained: bool = False,
        checkpoint: str | None = None,
        num_classes: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        method: str | None = None,
        method_options: dict[str, Any] | None = None,
        second_order: bool = False,
        relevance_loss: str | nn.Module = "robustvit",
        relevance_loss_options: dict[str, Any] | None = None,
        lambda_seg: float = 0.8,
        lambda_cls: float = 0.2,
        classification: str = "self",
        temperature: float = 1.0,
        freeze: Sequence[str] = (),
        lr: float = 3e-6,
        weight_decay: float = 1e-4,
        lr_step_epochs: int = 2,
        lr_gamma: float = 0.85,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        eval_relevance: bool = True,
        relevance_every: int = 1,
        lambda_cf: float = 0.0,
        lambda_faith: float = 0.0,
        nonfinite: str = "error",
        max_skipped: int = 3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["optimizer", "scheduler"] + (["model"] if isinstance(model, nn.Module) else [])
        )
        if isinstance(model, str):
            self.model = build_model(model, pretrained, None, num_classes, **(model_kwargs or {}))
        elif isinstance(model, nn.Module):
            self.model = model
        else:
            raise TypeError(
                f"Expected model a timm model name or an nn.Module, but got {type(model).__name__}."
            )
        if checkpoint is not None:
            load_weights(self.model, checkpoint)
        self.model.train()  # Lightning keeps modules in the mode it finds them in
        if isinstance(relevance_loss, str):
            relevance_loss = create_relevance_loss(relevance_loss, **(relevance_loss_options or {}))
        elif relevance_loss_options:
            raise ValueError(
                "Expected relevance_loss_options only with a relevance loss given by name, but got "
                f"{relevance_loss_options!r} with a {type(relevance_loss).__name__} instance."
            )
        self.relevance_loss = relevance_loss
        self.method = method or getattr(relevance_loss, "method", "chefer")
        info = explainer_info(self.method)
        if not info.differentiable:
            raise ValueError(
                f"Expected a differentiable explainer for method, but {self.method!r} is not "
                "(its maps cannot carry a loss's gradient); use e.g. 'chefer'."
            )
        self.method_options = dict(method_options or {})
        unknown = sorted(set(self.method_options) - set(info.options))
        if unknown:
            raise TypeError(
                f"Expected method_options among {list(info.options)} for {self.method!r}, but got "
                f"unknown {unknown}."
            )
        if info.output == "grid":
            find_attention_modules(self.model)  # fail now, not at the first step
        self.normalize = getattr(relevance_loss, "normalize", True)
        self.second_order = second_order
        for name, value in (
            ("lambda_seg", lambda_seg),
            ("lambda_cls", lambda_cls),
            ("lambda_cf", lambda_cf),
            ("lambda_faith", lambda_faith),
        ):
            if value < 0:
                raise ValueError(f"Expected {name} >= 0, but got {value}.")
        self.lambda_seg, self.lambda_cls, self.lambda_cf = lambda_seg, lambda_cls, lambda_cf
        self.lambda_faith = lambda_faith
        check_positive_int("relevance_every", relevance_every)
        self.classification_loss = ClassificationLoss(classification, temperature)
        self.teacher = (
            copy.deepcopy(self.model).eval().requires_grad_(False)
            if classification == "teacher"
            else None
        )
        freeze_parameters(self.model, freeze)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.eval_relevance = eval_relevance
        self.nonfinite_guard = NonFiniteGuard(nonfinite, max_skipped)
        num = self._num_classes()
        self.train_acc = MulticlassAccuracy(num, average="micro")
        self.eval_acc = nn.ModuleList()
        self.eval_mass = nn.ModuleList()
        self._eval_names: list[str] = []

    # ----------------------------------------------------------------- setup
    def _num_classes(self) -> int:
        n = getattr(self.model, "num_classes", None)
        if not isinstance(n, int) or n < 2:
            raise ValueError(
                f"Expected a classifier with num_classes >= 2, but the model reports {n!r}."
            )
        return n

    def _setup_eval_metrics(self) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(dm, "eval_names", ["id"]))
        if names == self._eval_names:
            return
        self._eval_names = names
        num = self._num_classes()
        self.eval_acc = nn.ModuleList([MulticlassAccuracy(num, average="micro") for _ in names]).to(
            self.device
        )
        self.eval_mass = nn.ModuleList([RelevanceMass() for _ in names]).to(self.device)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.nonfinite_guard.check_world_size(self.trainer.world_size)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, K)`` of images ``(B, 3, H, W)``."""
        return self.model(images)

    # ------------------------------------------------------------------ step
    def model_step(
        self, batch: dict[str, Tensor], relevance: bool, counterfactual: bool = False
    ) -> dict[str, Tensor]:
        """Logits ``(B, K)``, relevance maps and losses of a batch, in one pass over each sample.

        With ``relevance``, only the samples that have a mask go through the explainer (one more
        backward pass for the attention gradients); the others take the model's plain forward
        pass. ViTs have no batch-coupled layers, so the split changes no value. ``out["maps"]``
        holds the masked samples' maps, in the order of ``out["masked"]`` (their indices in the
        batch).
        """
        images, labels = batch["image"], batch["label"]
        has_mask = batch["has_mask"].bool()
        out: dict[str, Tensor] = {}
        if relevance and has_mask.any():
            masked = has_mask.nonzero().flatten()
            rest = (~has_mask).nonzero().flatten()
            whole = rest.numel() == 0
            with torch.enable_grad():
                exp = explain_with_logits(
                    self.model,
                    images if whole else images[masked],
                    self.method,
                    target=labels if whole else labels[masked],
                    differentiable=True,
                    second_order=self.second_order,
                    **self.method_options,
                )
                masks = batch["mask"] if whole else batch["mask"][masked]
                pix = to_pixels(exp.maps, size=masks.shape[-2:], normalize=self.normalize)
                if torch.isfinite(exp.maps).all():
                    rel = dict(self.relevance_loss(pix, masks.to(pix.dtype)))
                else:  # reported by the step (relreg.lightning.nonfinite), not inside the loss
                    nan = pix.new_full((), float("nan"))
                    rel = {"loss": nan, "loss_bg": nan, "loss_fg": nan}
                if counterfactual and self.lambda_faith > 0 and masked.numel() > 1:
                    sub = images[masked]
                    share = background_effect_share(
                        self.model, sub, masks.to(sub.dtype), labels[masked], exp.logits
                    )
                    rel["loss_faith"] = faithfulness_loss(pix, masks, share)
            logits = (
                exp.logits if whole else _merge(exp.logits, masked, self.model(images[rest]), rest)
            )
            out.update(maps=exp.maps, masked=masked)
        else:
            logits = self.model(images)
            zero = logits.new_zeros(())
            rel = {"loss": zero, "loss_bg": zero, "loss_fg": zero}
        with torch.no_grad():
            teacher_logits = None if self.teacher is None else self.teacher(images)
        loss_cls = self.classification_loss(logits, labels, teacher_logits)
        loss_cf = logits.new_zeros(())
        if counterfactual and self.lambda_cf > 0 and has_mask.sum() > 1:
            masked = has_mask.nonzero().flatten()
            swapped = swap_backgrounds(images[masked], batch["mask"][masked].to(images.dtype))
            loss_cf = counterfactual_loss(logits[masked], self.model(swapped))
        out.update(
            logits=logits,
            loss=self.lambda_seg * rel["loss"]
            + self.lambda_cls * loss_cls
            + self.lambda_cf * loss_cf
            + self.lambda_faith * rel.get("loss_faith", 0.0),
            loss_cf=loss_cf,
            loss_faith=rel.get("loss_faith", logits.new_zeros(())),
            loss_cls=loss_cls,
            loss_bg=rel["loss_bg"],
            loss_fg=rel["loss_fg"],
        )
        return out

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.teacher is not None:
            self.teacher.eval()
        every = self.hparams.relevance_every
        out = self.model_step(
            batch,
            relevance=self.lambda_seg + self.lambda_faith > 0 and self.global_step % every == 0,
            counterfactual=True,
        )
        if self.nonfinite_guard.skip(self, out, batch, batch_idx):
            return None  # skipped: no backward pass, no optimiser step
        self.train_acc(out["logits"].detach(), batch["label"])
        b = batch["label"].shape[0]
        extra = ("loss_cf",) * (self.lambda_cf > 0) + ("loss_faith",) * (self.lambda_faith > 0)
        for key in ("loss", "loss_cls", "loss_bg", "loss_fg", *extra):
            self.log(f"train/{key}", out[key].detach(), prog_bar=key == "loss", batch_size=b)
        self.log("train/acc", self.train_acc, prog_bar=True, batch_size=b)
        return out["loss"]

    def _eval_step(self, stage: str, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        if self.eval_relevance and torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Relevance metrics need gradients, but Lightning runs evaluation under "
                "torch.inference_mode(). Use Trainer(inference_mode=False) (relreg's CLI and configs "
                "set it) or RelRegModule(eval_relevance=False)."
            )
        self._setup_eval_metrics()
        name = (
            self._eval_names[dataloader_idx]
            if dataloader_idx < len(self._eval_names)
            else str(dataloader_idx)
        )
        prefix = stage if name == "id" else f"ood/{name}"
        out = self.model_step(batch, relevance=self.eval_relevance)
        if "relevance" in nonfinite_terms(out):
            raise NonFiniteError(f"Non-finite relevance in {stage} (batch of {name!r}).")
        logits = score_logits(out["logits"].detach(), self._scoring_classes(dataloader_idx))
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
        if name == "id":
            for key in ("loss", "loss_cls", "loss_bg", "loss_fg"):
                self.log(  # sync_dist: under DDP the mean over all ranks, not rank 0's
                    f"{prefix}/{key}",
                    out[key].detach(),
                    batch_size=b,
                    add_dataloader_idx=False,
                    sync_dist=True,
                )
        if "maps" in out:
            masks = batch["mask"][out["masked"]]
            self.eval_mass[dataloader_idx].update(out["maps"].detach(), masks)
            self.log(
                f"{prefix}/relevance_mass",
                self.eval_mass[dataloader_idx],
                batch_size=b,
                add_dataloader_idx=False,
                metric_attribute=f"eval_mass.{dataloader_idx}",
            )

    def _scoring_classes(self, dataloader_idx: int) -> Tensor | None:
        dm = getattr(self.trainer, "datamodule", None)
        name = self._eval_names[dataloader_idx]
        dataset = getattr(dm, "ood", {}).get(name) if dm is not None else None
        return scoring_classes(dataset)

    def validation_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def predict_step(
        self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """Logits ``(B, K)`` and raw maps of the top-1 class for a batch."""
        with torch.enable_grad():
            exp = explain_with_logits(
                self.model, batch["image"], self.method, **self.method_options
            )
        return {"logits": exp.logits, "maps": exp.maps}

    # ------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("Expected some trainable parameters, but every parameter is frozen.")
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.AdamW(
                params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
            )
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, self.hparams.lr_step_epochs, self.hparams.lr_gamma
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }


def _merge(first: Tensor, first_index: Tensor, second: Tensor, second_index: Tensor) -> Tensor:
    """Rows of two tensors put back in batch order: ``out[first_index] = first`` and so on."""
    out = first.new_empty((first.shape[0] + second.shape[0], *first.shape[1:]))
    return out.index_copy(0, first_index, first).index_copy(0, second_index, second)
