"""RelRegModule: one forward per step, the loss equals its reference, parameters, evaluation."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torchvision

from relreg.data import EvalSplit, RelRegDataModule, SpuriousShapes
from relreg.explain import explain, to_pixels
from relreg.lightning import RelRegModule, connect
from relreg.losses import (
    background_effect_share,
    classification_loss,
    counterfactual_loss,
    faithfulness_loss,
    robustvit_loss,
    swap_backgrounds,
)
from relreg.metrics import relevance_mass
from relreg.models import build_model

TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)


def _objective(
    seg: float = 0.8,
    cls: float = 0.2,
    rel: str = "robustvit",
    rel_options: dict | None = None,
    target: str = "self",
    temperature: float = 1.0,
    cf: float = 0.0,
    faith: float = 0.0,
) -> list[dict]:
    """An objective in the order relreg's configs use: relevance, faithfulness, classification,
    counterfactual; terms of weight 0 left out."""
    terms = [
        {"term": rel, "weight": seg, "options": rel_options or {}},
        {"term": "faithfulness", "weight": faith},
        {
            "term": "classification",
            "weight": cls,
            "options": {"target": target, "temperature": temperature},
        },
        {"term": "counterfactual", "weight": cf},
    ]
    return [t for t in terms if t["weight"] > 0 or t["term"] == "classification"]


def _module(objective: list[dict] | None = None, **kw) -> RelRegModule:
    torch.manual_seed(0)
    return RelRegModule(
        "vit_tiny_patch16_224", num_classes=4, model_kwargs=TINY, objective=objective, **kw
    )


def _batch(n=6, masked_fraction=1.0, seed=0):
    ds = SpuriousShapes("train", n=n, seed=seed, masked_fraction=masked_fraction)
    return {
        k: torch.stack([ds[i][k] for i in range(n)]) for k in ("image", "label", "mask", "has_mask")
    }


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kw})


def test_one_forward_pass_per_step():
    module = _module()
    calls = []
    module.model.register_forward_hook(lambda *a: calls.append(1))
    module.training_step(_batch(), 0)
    assert len(calls) == 1


def test_loss_equals_reference():
    options = {"lambda_bg": 1.5, "lambda_fg": 0.4}
    module = _module(_objective(0.7, 0.3, rel_options=options, temperature=0.5))
    batch = _batch(masked_fraction=0.5, seed=1)
    out = module.model_step(batch, training=False)
    maps = explain(module.model, batch["image"], "chefer", target=batch["label"])
    rel = robustvit_loss(to_pixels(maps, size=(32, 32)), batch["mask"], 1.5, 0.4, batch["has_mask"])
    cls = classification_loss(module.model(batch["image"]), "self", temperature=0.5)
    torch.testing.assert_close(out.loss, 0.7 * rel["loss"] + 0.3 * cls)
    torch.testing.assert_close(out.terms["loss_bg"], rel["loss_bg"])


def test_method_options_reach_the_explainer():
    module = _module(_objective(1.0, 0.0), explainer={"options": {"gradient": "logits"}})
    batch = _batch(masked_fraction=1.0, seed=2)
    out = module.model_step(batch, training=False)
    rel = {}
    for gradient in ("logits", "attention"):
        maps = explain(
            module.model, batch["image"], "chefer", target=batch["label"], gradient=gradient
        )
        rel[gradient] = robustvit_loss(
            to_pixels(maps, size=(32, 32)), batch["mask"], 2.0, 0.3, batch["has_mask"]
        )["loss"]
    torch.testing.assert_close(out.loss, rel["logits"])
    assert not torch.allclose(rel["logits"], rel["attention"])
    with pytest.raises(
        TypeError, match=r"explainer options among \['start_layer', 'gradient', 'engine'"
    ):
        _module(explainer={"options": {"grad": "logits"}})
    with pytest.raises(ValueError, match=r"explainer keys among .* but got unknown \['lr'\]"):
        _module(explainer={"lr": 1.0})


def test_gradient_of_the_relevance_term_reaches_attention_weights():
    module = _module(_objective(cls=0.0))
    module.training_step(_batch(), 0).backward()
    assert module.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_control_arm_computes_no_relevance():
    module = _module(_objective(seg=0.0, target="label"))
    calls = []
    module.model.register_forward_hook(lambda *a: calls.append(1))
    out = module.model_step(_batch(), training=True)
    assert out.maps is None and set(out.terms) == {"loss_cls"}
    assert not module.objective.needs_maps and len(calls) == 1


def test_freeze_patterns():
    module = _module(freeze=["patch_embed.*", "blocks.0.*"])
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert "patch_embed.proj.weight" in frozen and "blocks.0.attn.qkv.weight" in frozen
    assert "blocks.1.attn.qkv.weight" not in frozen
    opt = module.configure_optimizers()["optimizer"]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in module.model.parameters() if p.requires_grad
    )
    with pytest.raises(ValueError, match="matches no parameter"):
        _module(freeze=["encoder.*"])


def test_default_optimiser_is_the_papers():
    conf = _module().configure_optimizers()
    opt = conf["optimizer"]
    sched = conf["lr_scheduler"]["scheduler"]
    assert (
        isinstance(opt, torch.optim.AdamW)
        and opt.defaults["weight_decay"] == 1e-4
        and opt.defaults["lr"] == 3e-6
    )
    assert (
        isinstance(sched, torch.optim.lr_scheduler.StepLR)
        and sched.step_size == 2
        and sched.gamma == 0.85
    )


def test_teacher_is_a_frozen_copy():
    module = _module(_objective(target="teacher"))
    teacher = module.objective.terms[1].teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.head.weight, module.model.head.weight)
    assert teacher.head.weight.data_ptr() != module.model.head.weight.data_ptr()
    module.train()
    assert not teacher.training  # stays in eval mode when Lightning puts the module in train mode
    out = module.model_step(_batch(), training=True)
    assert out.terms["loss_cls"].abs().item() < 1e-6  # KL to itself
    assert any(k.startswith("objective.terms.1.teacher.") for k in module.state_dict())


def test_construction_errors():
    with pytest.raises(ValueError, match="found none in ResNet"):
        RelRegModule(torchvision.models.resnet18(num_classes=3))
    with pytest.raises(ValueError, match="Unknown objective term 'l1'; expected one of: robustvit"):
        _module([{"term": "l1"}])
    with pytest.raises(ValueError, match="Unknown explainer"):
        _module(explainer={"method": "no_such_method"})
    with pytest.raises(TypeError, match="timm model name or an nn.Module"):
        RelRegModule(3)
    with pytest.raises(ValueError, match=r"objective\[0\].weight a number >= 0, but got -1.0"):
        _module([{"term": "robustvit", "weight": -1.0}])
    with pytest.raises(ValueError, match=r"objective\[1\] to have a 'term'"):
        _module([{"term": "robustvit"}, {"weight": 1.0}])
    with pytest.raises(TypeError, match="Expected objective a list of terms, but got str"):
        _module("robustvit")
    with pytest.raises(ValueError, match=r"each objective term once, but got \['robustvit'\]"):
        _module([{"term": "robustvit"}, {"term": "robustvit"}])
    with pytest.raises(ValueError, match="faults keys among"):
        _module(faults={"policy": "skip"})


def test_rrr_loss_uses_a_gradient_map():
    module = _module(_objective(rel="rrr"))
    assert module.explainer.method == "saliency" and not module.explainer.normalize
    module.training_step(_batch(), 0).backward()
    assert module.model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_evaluation_under_inference_mode_is_explained():
    dm = RelRegDataModule(val=SpuriousShapes("val", n=4), batch_size=4)
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        _trainer(inference_mode=True).validate(_module(), datamodule=dm, verbose=False)


def test_fit_and_validate_log_the_contracted_keys():
    dm = RelRegDataModule(
        SpuriousShapes("train", n=8),
        SpuriousShapes("val", n=8),
        ood={"ood": SpuriousShapes("ood", n=8)},
        batch_size=4,
    )
    trainer = _trainer(
        inference_mode=False, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0
    )
    module = _module()
    connect(module, dm)
    trainer.fit(module, datamodule=dm)
    keys = set(trainer.callback_metrics)
    for k in (
        "train/loss",
        "train/loss_cls",
        "train/loss_bg",
        "train/loss_fg",
        "train/loss_seg",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/relevance_mass",
        "ood/ood/acc",
        "ood/ood/relevance_mass",
    ):
        assert k in keys, k


def test_lightning_checkpoint_loads_into_build_model(tmp_path):
    module = _module()
    trainer = _trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=RelRegDataModule(SpuriousShapes("train", n=4), batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    model = build_model(
        "vit_tiny_patch16_224", checkpoint=tmp_path / "m.ckpt", num_classes=4, **TINY
    )
    assert torch.equal(model.head.weight, module.model.head.weight)


@pytest.mark.slow
def test_short_finetune_raises_relevance_mass():
    torch.manual_seed(0)
    module = RelRegModule(
        "vit_tiny_patch16_224",
        num_classes=4,
        model_kwargs=dict(TINY, patch_size=4),
        objective=_objective(1.0, 0.1, target="label"),
        optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=1e-4),
    )
    test = SpuriousShapes("test", n=64)

    def mass():
        maps = explain(module.model.eval(), test.images, "chefer", target=test.labels)
        module.model.train()
        return relevance_mass(maps, test.masks).item()

    before = mass()
    _trainer(max_steps=40).fit(
        module, datamodule=RelRegDataModule(SpuriousShapes("train", n=64), batch_size=16)
    )
    assert mass() > before + 0.2


def test_only_masked_samples_go_through_the_explainer():
    module = _module()
    batch = _batch(n=6, masked_fraction=0.5, seed=1)
    assert 0 < batch["has_mask"].sum() < 6
    sizes = []
    module.model.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    out = module.model_step(batch, training=True)
    assert sorted(sizes) == sorted([int(batch["has_mask"].sum()), int((~batch["has_mask"]).sum())])
    torch.testing.assert_close(out.logits, module.model(batch["image"]), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.masked, batch["has_mask"].nonzero().flatten())


def test_batch_without_masks_has_zero_relevance_loss():
    module = _module()
    out = module.model_step(_batch(masked_fraction=0.0), training=True)
    assert out.terms["loss_bg"].item() == 0.0 and out.maps is None
    out.loss.backward()
    assert module.model.head.weight.grad is not None


def test_relevance_every_k_steps():
    module = _module(relevance_every=3)
    seen = []
    original = module.model_step
    module.model_step = lambda batch, training: (
        seen.append(original(batch, training).maps is not None) or original(batch, training)
    )
    trainer = _trainer(max_steps=6)
    trainer.fit(module, datamodule=RelRegDataModule(SpuriousShapes("train", n=24), batch_size=4))
    assert seen == [True, False, False, True, False, False]
    with pytest.raises(ValueError, match="relevance_every an int >= 1"):
        _module(relevance_every=0)


def test_counterfactual_term_equals_its_reference_and_trains():
    module = _module(_objective(seg=0.0, cls=1.0, target="label", cf=0.5))
    batch = _batch(masked_fraction=0.5, seed=3)
    out = module.model_step(batch, training=True)
    m = batch["has_mask"]
    logits = module.model(batch["image"])
    cf = counterfactual_loss(
        logits[m], module.model(swap_backgrounds(batch["image"][m], batch["mask"][m]))
    )
    cls = classification_loss(logits, "label", batch["label"])
    torch.testing.assert_close(out.terms["loss_cf"], cf)
    torch.testing.assert_close(out.loss, cls + 0.5 * cf)
    assert cf.item() > 0
    # evaluation steps compute no counterfactual (it is not part of val/loss)
    assert "loss_cf" not in module.model_step(batch, training=False).terms
    # a batch with fewer than 2 masked samples has none to swap: zero
    one = _batch(masked_fraction=0.0, seed=3)
    one["has_mask"][0] = True
    assert module.model_step(one, training=True).terms["loss_cf"].item() == 0.0
    module.training_step(batch, 0).backward()
    assert module.model.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"objective\[2\].weight a number >= 0"):
        _module(_objective(cf=1.0)[:2] + [{"term": "counterfactual", "weight": -1.0}])


def test_faithfulness_anchor_equals_its_reference_and_trains():
    module = _module(_objective(seg=1.0, cls=1.0, target="label", faith=2.0))
    batch = _batch(masked_fraction=0.5, seed=3)
    out = module.model_step(batch, training=True)
    m = batch["has_mask"]
    x = batch["image"][m]
    masks = batch["mask"][m]
    labels = batch["label"][m]
    maps = explain(module.model, x, "chefer", target=labels)
    share = background_effect_share(module.model, x, masks, labels, module.model(x))
    ref = faithfulness_loss(to_pixels(maps, size=masks.shape[-2:]), masks, share)
    torch.testing.assert_close(out.terms["loss_faith"], ref)
    rest = out.loss - 2.0 * out.terms["loss_faith"]
    torch.testing.assert_close(
        rest, out.terms["loss_cls"] + robustvit_loss(to_pixels(maps, size=(32, 32)), masks)["loss"]
    )
    # evaluation steps compute no anchor; without a relevance term the maps are still computed
    assert "loss_faith" not in module.model_step(batch, training=False).terms
    only = _module(_objective(seg=0.0, cls=1.0, target="label", faith=1.0))
    assert only.objective.needs_maps
    loss = only.training_step(batch, 0)
    assert loss > only.model_step(batch, training=False).loss
    loss.backward()
    assert only.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="Expected train to be one of"):
        _module([{"term": "faithfulness", "options": {"train": "neither"}}])


def test_term_options_go_to_the_named_term_only():
    module = _module(_objective(rel_options={"lambda_bg": 1.25}))
    loss = module.objective.terms[0].loss
    assert loss.lambda_bg == 1.25 and loss.lambda_fg == 0.3
    with pytest.raises(
        ValueError,
        match=r"Expected options of objective term 'mass' among \[\], but got \['lambda_bg'\]",
    ):
        _module([{"term": "mass", "options": {"lambda_bg": 1.0}}])


@pytest.mark.parametrize("loss", ["robustvit", "mass", "rrr"])
def test_paper_config_model_section_takes_every_relevance_term(loss):
    from pathlib import Path

    import yaml

    from relreg.losses import RobustViTLoss

    base = Path(__file__).resolve().parents[2] / "configs" / "paper" / "base.yaml"
    section = yaml.safe_load(base.read_text())["model"]
    objective = section["objective"]
    if loss != "robustvit":
        objective = [{"term": loss, "weight": 0.8}, objective[1]]
    module = _module(objective, explainer={"method": None})
    assert module.objective.weights == [0.8, 0.2]
    assert module.explainer.method == ("saliency" if loss == "rrr" else "chefer")
    if loss == "robustvit":  # the paper's weights
        assert isinstance(module.objective.terms[0].loss, RobustViTLoss)
        pair = (module.objective.terms[0].loss.lambda_bg, module.objective.terms[0].loss.lambda_fg)
        assert pair == (2.0, 0.3)


def test_evaluation_splits_are_wired_explicitly():
    dm = RelRegDataModule(
        val=SpuriousShapes("val", n=4), ood={"shifted": SpuriousShapes("ood", n=4)}, batch_size=4
    )
    module = _module(explainer={"evaluate": False})
    # not connected: the module knows one split and names the missing call at the second loader
    with pytest.raises(ValueError, match=r"relreg\.lightning\.connect\(module, datamodule\)"):
        _trainer(inference_mode=False).validate(module, datamodule=dm, verbose=False)
    connect(module, dm)
    assert [s.name for s in module.eval_splits] == ["id", "shifted"]
    results = _trainer(inference_mode=False).validate(module, datamodule=dm, verbose=False)
    assert {"val/acc", "ood/shifted/acc"} <= {k for d in results for k in d}


def test_connect_and_set_eval_splits_errors():
    module = _module()
    with pytest.raises(TypeError, match="Expected datamodule a RelRegDataModule"):
        connect(module, object())
    with pytest.raises(TypeError, match="Expected module a RelRegModule"):
        connect(object(), RelRegDataModule())
    with pytest.raises(TypeError, match="EvalSplit"):
        module.set_eval_splits(["id"])
    with pytest.raises(ValueError, match="distinct split names"):
        module.set_eval_splits([EvalSplit("id"), EvalSplit("id")])
    assert [s.name for s in module.eval_splits] == ["id"]  # nothing half-changed
