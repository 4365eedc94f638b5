"""Callbacks with real loggers: offline W&B (images in the run directory), CSV; resume state."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from relreg.data import RelRegDataModule, SpuriousShapes
from relreg.lightning import ExplanationQuality, RelevanceHeatmapLogger, RelRegModule
from relreg.metrics import relevance_mass

TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)


def _fit(tmp_path, logger, callbacks, inference_mode=False, steps=2):
    torch.manual_seed(0)
    explainer = {"evaluate": not inference_mode}
    module = RelRegModule(
        "vit_tiny_patch16_224", num_classes=4, model_kwargs=TINY, explainer=explainer
    )
    dm = RelRegDataModule(SpuriousShapes("train", n=8), SpuriousShapes("val", n=12), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        inference_mode=inference_mode,
        limit_val_batches=3,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module


def test_heatmaps_land_in_the_offline_wandb_run(tmp_path):
    import wandb

    logger = WandbLogger(save_dir=tmp_path, offline=True, project="t")
    try:
        _fit(tmp_path, logger, [RelevanceHeatmapLogger(num_images=3)])
    finally:
        wandb.finish()
    pngs = list((tmp_path / "wandb").rglob("*heatmaps*.png"))
    assert pngs, list((tmp_path / "wandb").rglob("*"))[:20]


def test_a_second_offline_wandb_run_in_the_same_directory_gets_its_own_run(tmp_path):
    import wandb

    for _ in range(2):
        logger = WandbLogger(save_dir=tmp_path, offline=True, project="t")
        try:
            _fit(tmp_path, logger, [RelevanceHeatmapLogger(num_images=2)], steps=2)
        finally:
            wandb.finish()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert all(list(run.rglob("*heatmaps*.png")) for run in runs)


def test_png_fallback_for_csv_logger_and_fixed_images(tmp_path):
    cb = RelevanceHeatmapLogger(num_images=4, seed=1)
    trainer, _ = _fit(tmp_path, CSVLogger(tmp_path), [cb], inference_mode=True)
    files = list((tmp_path / "lightning_logs").rglob("heatmaps/epoch*.png"))
    assert len(files) == 1  # the sanity check logs nothing
    assert len(cb.indices) == 4 and cb.indices == sorted(cb.indices)
    resumed = RelevanceHeatmapLogger(num_images=4, seed=99)
    resumed.load_state_dict(cb.state_dict())
    assert resumed.indices == cb.indices


def test_explanation_quality_logs_val_xai_and_matches_the_metric(tmp_path):
    cb = ExplanationQuality(num_batches=1)
    trainer, module = _fit(tmp_path, CSVLogger(tmp_path), [cb])
    for key in (
        "relevance_mass",
        "relevance_rank_accuracy",
        "pointing_game",
        "pixel_accuracy",
        "miou",
        "map",
    ):
        assert f"val/xai/{key}" in trainer.callback_metrics, key
    val = SpuriousShapes("val", n=12)
    batch = [val[i] for i in range(4)]
    images = torch.stack([b["image"] for b in batch])
    labels = torch.stack([b["label"] for b in batch])
    masks = torch.stack([b["mask"] for b in batch])
    from relreg.explain import explain

    ref = relevance_mass(explain(module.model.eval(), images, "chefer", target=labels), masks)
    assert cb.last["relevance_mass"] == pytest.approx(ref.item(), abs=1e-5)


def test_callback_argument_errors():
    with pytest.raises(ValueError, match="num_images"):
        RelevanceHeatmapLogger(num_images=60)
    with pytest.raises(ValueError, match="every_n_epochs"):
        ExplanationQuality(every_n_epochs=0)
    with pytest.raises(ValueError, match="'nope'"):
        ExplanationQuality(metrics=["sparseness", "nope"])
    with pytest.raises(TypeError, match="Expected metrics a list of metric names"):
        ExplanationQuality(metrics="sparseness")
    with pytest.raises(ValueError, match="distinct names"):
        ExplanationQuality(metrics=["sparseness", "sparseness"])
    with pytest.raises(ValueError, match="metric_every's names among the callback's metrics"):
        ExplanationQuality(metrics=["sparseness"], metric_every={"deletion": 2})
    with pytest.raises(ValueError, match="Expected metric_every\\['sparseness'\\] an int >= 1"):
        ExplanationQuality(metrics=["sparseness"], metric_every={"sparseness": 0})


def test_explanation_quality_logs_a_chosen_subset_and_guards_the_costly_one(tmp_path):
    import csv

    from relreg.explain import explain, to_pixels
    from relreg.metrics import sparseness

    names = ["sparseness", "deletion", "top_k_intersection"]
    cb = ExplanationQuality(num_batches=1, metrics=names, metric_every={"deletion": 2})
    trainer, module = _fit(tmp_path, CSVLogger(tmp_path), [cb], steps=8)  # 4 epochs of 2 steps
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/xai/sparseness")]
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert [bool(r["val/xai/deletion"]) for r in rows] == [False, True, False, True]
    assert all(r["val/xai/top_k_intersection"] for r in rows)
    assert "val/xai/relevance_mass" not in trainer.callback_metrics  # not chosen
    # the logged sparseness is that of the maps upsampled to the images
    val = SpuriousShapes("val", n=12)
    images = torch.stack([val[i]["image"] for i in range(4)])
    labels = torch.stack([val[i]["label"] for i in range(4)])
    maps = explain(module.model.eval(), images, "chefer", target=labels)
    ref = sparseness(to_pixels(maps, size=images.shape[-2:], normalize=False))
    assert cb.last["sparseness"] == pytest.approx(ref.item(), abs=1e-5)


def test_ood_evaluation_logs_accuracy_and_mean_and_can_be_monitored(tmp_path):
    from relreg.lightning import OODEvaluation

    ood = {"ood": SpuriousShapes("ood", n=10), "test": SpuriousShapes("test", n=6)}
    cb = OODEvaluation(ood, batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="ood/mean_acc", mode="max")
    trainer, module = _fit(tmp_path, CSVLogger(tmp_path), [cb, ckpt])
    module.model.eval()
    for name, ds in ood.items():
        with torch.no_grad():
            ref = (module.model(ds.images).argmax(1) == ds.labels).float().mean().item()
        assert cb.last[name] == pytest.approx(ref)
        assert trainer.callback_metrics[f"ood/{name}/acc"].item() == pytest.approx(ref)
    assert trainer.callback_metrics["ood/mean_acc"].item() == pytest.approx(
        sum(cb.last.values()) / 2
    )
    assert ckpt.best_model_path
    with pytest.raises(ValueError, match="at least one"):
        OODEvaluation({})


def _tensorboard_events(folder) -> list:
    """Every ``Event`` in the TensorBoard files under ``folder`` (TFRecord framing read by hand)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def test_heatmaps_and_xai_metrics_land_in_tensorboard(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    cb = RelevanceHeatmapLogger(num_images=3)
    _fit(tmp_path, TensorBoardLogger(tmp_path, name="tb"), [cb, ExplanationQuality(num_batches=1)])
    values = [v for e in _tensorboard_events(tmp_path / "tb") for v in e.summary.value]
    images = [v for v in values if v.tag == "val/xai/heatmaps"]
    assert len(images) == 1  # one validation epoch after the sanity check, which logs nothing
    assert images[0].image.height > 100 and images[0].image.width > 100
    assert images[0].image.encoded_image_string[:4] == b"\x89PNG"
    assert {"val/xai/relevance_mass", "val/xai/pointing_game"} <= {v.tag for v in values}


def test_captions_name_the_datasets_classes_and_per_group_shows_every_group(tmp_path, monkeypatch):
    seen = {}

    def capture(self, trainer, figure, captions, *rest):
        seen["captions"] = captions

    monkeypatch.setattr(RelevanceHeatmapLogger, "_log", capture)
    cb = RelevanceHeatmapLogger(num_images=8, per_group=True)
    _fit(tmp_path, CSVLogger(tmp_path), [cb], inference_mode=True)
    shapes = SpuriousShapes("val", n=12).classes
    assert all(
        any(f"label {name}" in c for name in shapes) and "class " not in c for c in seen["captions"]
    ), seen["captions"]
    groups = SpuriousShapes("val", n=12).groups[cb.indices]
    present = SpuriousShapes("val", n=12).groups.unique()
    # round-robin over the groups: as many distinct groups as there are, up to 8 images
    assert len(groups.unique()) == min(8, len(present))
