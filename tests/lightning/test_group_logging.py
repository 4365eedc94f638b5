"""Validation and test log worst- and average-group accuracy for splits whose samples carry a
``group``, equal to the group accuracies of the module's own predictions computed by hand."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from relreg.data import RelRegDataModule, SpuriousShapes
from relreg.lightning import RelRegModule, connect
from relreg.metrics import group_accuracy
from tests.conftest import make_tiny_vit


def test_validation_logs_group_accuracies_equal_to_a_hand_computation(tmp_path):
    model = make_tiny_vit(img_size=32, patch_size=8, num_classes=4)
    module = RelRegModule(model, explainer={"evaluate": False})
    val = SpuriousShapes(split="val", n=48)
    ood = SpuriousShapes(split="ood", n=40)
    data = RelRegDataModule(
        train=SpuriousShapes(split="train", n=8),
        val=val,
        ood={"ood": ood},
        batch_size=4,
        eval_batch_size=16,
    )
    connect(module, data)
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        default_root_dir=tmp_path,
    )
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    for prefix, ds in (("val", val), ("ood/ood", ood)):
        batch = next(iter(DataLoader(ds, batch_size=len(ds))))
        with torch.no_grad():
            logits = model(batch["image"])
        expected = group_accuracy(logits, batch["label"], batch["group"], ds.num_groups)
        assert metrics[f"{prefix}/worst_group_acc"] == expected["worst_group_accuracy"].item()
        assert metrics[f"{prefix}/average_group_acc"] == expected["average_group_accuracy"].item()
