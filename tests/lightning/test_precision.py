"""The relevance loss and the callbacks under ``precision="bf16-mixed"`` on CPU, with gradient
accumulation; and the loss under bf16 autocast against the float32 loss."""

from __future__ import annotations

import functools
import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from relreg.data import RelRegDataModule, SpuriousShapes
from relreg.explain import explain, to_pixels
from relreg.lightning import ExplanationQuality, RelevanceHeatmapLogger, RelRegModule
from relreg.losses import robustvit_loss

TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)


def test_bf16_mixed_with_gradient_accumulation_trains_and_logs(tmp_path):
    torch.manual_seed(0)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-4)
    module = RelRegModule(
        "vit_tiny_patch16_224", num_classes=4, model_kwargs=TINY, optimizer=optimizer
    )
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    dm = RelRegDataModule(SpuriousShapes("train", n=16), SpuriousShapes("val", n=8), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        max_steps=2,
        logger=CSVLogger(tmp_path),
        callbacks=[RelevanceHeatmapLogger(num_images=2), ExplanationQuality(num_batches=1)],
        inference_mode=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        val_check_interval=4,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2  # 4 batches, accumulated by 2
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("patch_embed") for k in changed) and any("qkv" in k for k in changed)
    logged = trainer.callback_metrics
    for key in ("train/loss_bg", "train/loss_fg", "val/relevance_mass", "val/xai/relevance_mass"):
        assert math.isfinite(float(logged[key])), key
    assert list(tmp_path.rglob("heatmaps/epoch*.png"))
    assert all(p.dtype == torch.float32 for p in module.parameters())  # mixed, not pure bf16


def test_relevance_loss_under_bf16_autocast_is_close_to_float32():
    torch.manual_seed(0)
    model = RelRegModule("vit_tiny_patch16_224", num_classes=4, model_kwargs=TINY).model.eval()
    data = SpuriousShapes("val", n=6)
    images = data.images
    masks = data.masks

    def loss_and_grad(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            maps = explain(model, images, "chefer", differentiable=True)
            loss = robustvit_loss(to_pixels(maps.float(), size=(32, 32)), masks)["loss"]
        loss.backward()
        return loss.detach(), model.blocks[0].attn.qkv.weight.grad.clone()

    loss32, grad32 = loss_and_grad(False)
    loss16, grad16 = loss_and_grad(True)
    assert torch.isfinite(loss16) and grad16.abs().sum() > 0
    assert not torch.equal(grad16, grad32)  # autocast did run the model in bf16
    assert abs(float(loss16 - loss32)) <= 0.05 * abs(float(loss32))
    cosine = torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0)
    assert cosine > 0.9


def test_16_mixed_on_cpu_runs_as_bf16_mixed_as_the_docs_say():
    """Lightning turns ``precision="16-mixed"`` into bf16 on CPU, so the CPU tests cover fp16's
    path only through bf16; experiments/gpu_check.py checks fp16 on CUDA."""
    trainer = pl.Trainer(
        accelerator="cpu", precision="16-mixed", logger=False, enable_checkpointing=False
    )
    assert trainer.precision == "bf16-mixed"
