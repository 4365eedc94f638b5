"""The three recipes of docs/architecture.md work as written: a toy explainer, loss and metric added
the way the page says appear in ``list_explainers()``, ``RelRegModule`` and ``relreg evaluate``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import relreg.evaluation
import relreg.explain.registry
import relreg.metrics
import relreg.objective.term
from relreg.data import SpuriousShapes
from relreg.evaluation import evaluate_models
from relreg.explain import explain, list_explainers, to_pixels
from relreg.lightning import RelRegModule

PAGE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)


def _block(fence: str, containing: str) -> str:
    blocks = re.findall(rf"```{fence}\n(.*?)```", PAGE.read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"expected one {fence} block with {containing!r} in {PAGE.name}"
    return found[0]


@pytest.fixture
def recipes(monkeypatch) -> dict:
    """Run the page's three Python recipes; the registries are restored afterwards."""
    explainers = relreg.explain.registry.EXPLAINERS
    monkeypatch.setattr(explainers, "_entries", dict(explainers._entries))
    terms = relreg.objective.term.TERMS
    monkeypatch.setattr(terms, "_entries", dict(terms._entries))
    for registry in (relreg.metrics.METRICS, relreg.evaluation.DISPLAYS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    scope: dict = {}
    for marker in ("register_explainer(", "register_term(", "register_metric("):
        exec(compile(_block("python", marker), str(PAGE), "exec"), scope)
    return scope


def _vit(seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **TINY).eval()


def test_toy_explainer_is_registered_and_equals_a_per_image_gradient(recipes):
    assert "gradient_l2" in list_explainers()
    model, images = _vit(), torch.randn(3, 3, 32, 32)
    maps = explain(model, images, "gradient_l2", target=torch.tensor([0, 1, 2]))
    for i in range(3):
        x = images[i : i + 1].clone().requires_grad_(True)
        model(x)[0, i].backward()
        torch.testing.assert_close(maps[i], x.grad[0].norm(dim=0))


def test_toy_term_trains_by_name_with_the_yaml_options(recipes):
    options = yaml.safe_load(_block("yaml", "outside_l1"))["model"]
    module = RelRegModule(_vit(), num_classes=None, **options)
    term = module.objective.terms[0]
    assert type(term.loss).__name__ == "OutsideL1" and term.loss.weight == 0.5
    data = SpuriousShapes("train", n=4, masked_fraction=1.0)
    batch = {
        k: torch.stack([torch.as_tensor(data[i][k]) for i in range(4)])
        for k in ("image", "label", "mask", "has_mask")
    }
    out = module.model_step(batch, training=True)
    pix = to_pixels(out.maps.detach(), size=(32, 32))
    naive = torch.stack(
        [(p * (1 - m)).abs().mean() for p, m in zip(pix, batch["mask"], strict=True)]
    ).mean()
    torch.testing.assert_close(out.terms["loss_bg"].detach(), naive)
    out.loss.backward()
    assert module.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_toy_metric_reaches_the_report_the_summary_and_the_callback(recipes, tmp_path, capsys):
    import pytorch_lightning as pl

    from relreg.cli import _print_report
    from relreg.data import RelRegDataModule
    from relreg.lightning import ExplanationQuality

    model, data = _vit(), SpuriousShapes("test", n=6, masked_fraction=1.0)
    report = evaluate_models({"m": model}, data, methods=["chefer"], steps=2, progress=False)
    value = report["models"]["m"]["explainers"]["chefer"]["outside_peak"]
    images = torch.stack([data[i]["image"] for i in range(6)])
    masks = torch.stack([data[i]["mask"] for i in range(6)])
    pix = to_pixels(explain(model, images, "chefer"), size=(32, 32))
    naive = (
        sum(float(1 - m.flatten()[p.flatten().argmax()]) for p, m in zip(pix, masks, strict=True))
        / 6
    )
    assert value == pytest.approx(naive, abs=1e-4)
    _print_report(report)
    assert "out (lo)" in capsys.readouterr().out

    callback = ExplanationQuality(num_batches=1)
    module = RelRegModule(_vit(), objective=[{"term": "classification"}])
    dm = RelRegDataModule(SpuriousShapes("train", n=4), SpuriousShapes("val", n=4), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert "outside_peak" in callback.last and "relevance_mass" in callback.last


def test_registries_are_back_to_the_built_ins():
    assert "gradient_l2" not in list_explainers()
    assert "outside_l1" not in relreg.objective.list_terms()
    assert "outside_peak" not in relreg.metrics.list_metrics()
    assert "outside_peak" not in relreg.evaluation.DISPLAYS
