"""Preprocessing that follows the model's timm ``pretrained_cfg``, or RobustViT's convention."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import CSVLogger
from torchvision import tv_tensors

from relreg.data import (
    MaskedImageFolder,
    OODImageFolder,
    Preprocessing,
    RelRegDataModule,
    class_names,
    label_names,
    label_space,
)
from relreg.data.files import load_rgb
from relreg.lightning import RelRegModule, connect
from relreg.lightning.callbacks import _display_norm

WNIDS = ("n01443537", "n01484850", "n02085620")  # three ImageNet-1k classes, in sorted order


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth RGB image (resampling filters agree on it up to small differences)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [np.sin(2 * np.pi * (a * x + b * y) + c) for a, b, c in rng.uniform(0.3, 1.5, (3, 3))]
    return ((np.stack(chans, -1) + 1) * 127.5).astype(np.uint8)


@pytest.fixture
def tree(tmp_path):
    """wnid class folders: ``masked/images|masks/<wnid>/`` and an OOD split ``ood/<wnid>/``."""
    for k, wnid in enumerate(WNIDS):
        for j in range(2):
            image = Image.fromarray(_smooth(40, 52, 10 * k + j))
            for part in (tmp_path / "masked" / "images" / wnid, tmp_path / "ood" / wnid):
                part.mkdir(parents=True, exist_ok=True)
                image.save(part / f"{j}.png")
            mask = np.zeros((40, 52), np.uint8)
            mask[8:30, 10:40] = 1
            (tmp_path / "masked" / "masks" / wnid).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(tmp_path / "masked" / "masks" / wnid / f"{j}.png")
    return tmp_path


def _deit(num_classes: int = 1000) -> torch.nn.Module:
    """DeiT-tiny's architecture and pretrained_cfg (ImageNet mean/std, bicubic) at 32 px."""
    return timm.create_model(
        "deit_tiny_patch16_224.fb_in1k",
        pretrained=False,
        img_size=32,
        depth=1,
        num_classes=num_classes,
    )


def test_from_model_reads_timms_config():
    model = _deit()
    config = timm.data.resolve_model_data_config(model)
    pre = Preprocessing.from_model(model)
    assert pre.img_size == 32 and pre.resize == int(32 / config["crop_pct"])
    assert pre.mean == tuple(config["mean"]) and pre.std == tuple(config["std"])
    assert pre.interpolation == config["interpolation"] and pre.source.startswith("model:deit")
    assert Preprocessing.from_model(model, img_size=64).img_size == 64
    robust = Preprocessing.robustvit()
    assert (robust.resize, robust.mean, robust.std) == (256, (0.5,) * 3, (0.5,) * 3)


def test_eval_transform_matches_timms_own_transform():
    """On a smooth image, our tensor pipeline equals timm.data.create_transform's PIL one up to the
    resampling filters' differences (the same size, crop and normalisation)."""
    model = timm.create_model("deit_tiny_patch16_224.fb_in1k", pretrained=False, depth=1)
    config = timm.data.resolve_model_data_config(model)
    image = Image.fromarray(_smooth(300, 380, 0))
    want = timm.data.create_transform(**config)(image)
    got = Preprocessing.from_model(model).eval_transform()(
        tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    )
    assert got.shape == want.shape == (3, 224, 224)
    assert (got - want).abs().mean() < 0.02
    # RobustViT's convention on the same image differs by more than that (mean and std differ)
    robust = Preprocessing.robustvit().eval_transform()(
        tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    )
    assert (robust - want).abs().mean() > 0.1


@pytest.mark.parametrize("kind", ["masked", "ood"])
def test_datasets_follow_the_model_and_relabel_wnids(tree, kind):
    model = _deit()
    make = {
        "masked": lambda **kw: MaskedImageFolder(tree / "masked", train=False, **kw),
        "ood": lambda **kw: OODImageFolder(tree / "ood", **kw),
    }[kind]
    ds = make()
    assert "not resolved" in ds.preprocessing_info()["source"]
    assert ds.preprocessing == Preprocessing.robustvit(224)
    assert sorted(ds.class_to_idx.values()) == [0, 1, 2]  # no model yet: sorted folders
    assert ds.follow_model(model) and not ds.follow_model(model)  # the second call changes nothing
    assert ds.preprocessing == Preprocessing.from_model(model)
    assert ds.preprocessing_info()["source"] == Preprocessing.from_model(model).source
    imagenet = label_space("imagenet")
    assert ds.class_to_idx == {w: imagenet[w] for w in WNIDS}
    assert [int(ds[i]["label"]) for i in range(len(ds))] == [
        imagenet[w] for w in WNIDS for _ in "ab"
    ]
    path = ds.samples[3][0]
    raw = tv_tensors.Image(load_rgb(path))
    want = Preprocessing.from_model(model).eval_transform()(raw)
    torch.testing.assert_close(ds[3]["image"], want.as_subclass(torch.Tensor))
    if kind == "ood":
        assert ds.split_classes.tolist() == sorted(imagenet[w] for w in WNIDS)
    # a 10-class model keeps folder indices; explicit settings win over the model's
    small = make(img_size=24, mean=(0.1, 0.2, 0.3))
    assert small.follow_model(_deit(num_classes=10))
    assert sorted(small.class_to_idx.values()) == [0, 1, 2]
    assert small.preprocessing.img_size == 24 and small.preprocessing.mean == (0.1, 0.2, 0.3)
    assert small.preprocessing.std == Preprocessing.from_model(model).std
    assert small[0]["image"].shape == (3, 24, 24)
    fixed = make(preprocessing="robustvit")
    fixed.follow_model(_deit(num_classes=10))
    assert fixed.preprocessing == Preprocessing.robustvit(224)


def test_bad_preprocessing_is_named(tree):
    with pytest.raises(ValueError, match="preprocessing.*'timm'"):
        OODImageFolder(tree / "ood", preprocessing="timm")
    with pytest.raises(ValueError, match="std"):
        Preprocessing(std=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(interpolation="lanczos")
    with pytest.raises(ValueError, match="img_size"):
        MaskedImageFolder(tree / "masked", img_size=0)


def test_datamodule_resolves_and_logs_the_preprocessing(tree):
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=1e-4)
    module = RelRegModule(model=_deit(num_classes=1000), optimizer=optimizer)
    data = RelRegDataModule(
        MaskedImageFolder(tree / "masked", img_size=32),
        MaskedImageFolder(tree / "masked", train=False),
        ood={"sketch": OODImageFolder(tree / "ood", preprocessing="robustvit", img_size=32)},
        batch_size=3,
    )
    logger = CSVLogger(tree / "logs")
    trainer = Trainer(
        max_steps=1,
        limit_val_batches=1,
        inference_mode=False,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    connect(module, data)
    trainer.validate(module, data)
    expected = Preprocessing.from_model(module.model)
    assert data.preprocessing["val"] == expected.describe()
    assert data.preprocessing["train"]["img_size"] == 32  # the dataset's own override
    assert data.preprocessing["train"]["mean"] == list(expected.mean)
    assert data.preprocessing["sketch"]["source"] == "robustvit"
    logged = logger.experiment.hparams["data/preprocessing"]
    assert logged["val"]["source"] == expected.source


def test_datamodule_refuses_to_run_before_following_a_model(tree):
    data = RelRegDataModule(val=OODImageFolder(tree / "ood", preprocessing="model"))
    with pytest.raises(ValueError, match=r"\['val', 'test'\] have not.*connect"):
        data.setup("validate")
    data.follow_model(_deit())
    data.setup("validate")


def test_display_names_and_norm(tree):
    assert label_names(1000) == class_names(1000)
    assert label_names(4, {"cat": 2, "dog": 0}) == ["dog", "class 1", "cat", "class 3"]
    ds = OODImageFolder(tree / "ood")
    ds.follow_model(_deit())
    mean, std = _display_norm(ds, None, None)
    assert mean.flatten().tolist() == pytest.approx(list(ds.preprocessing.mean))
    assert std.flatten().tolist() == pytest.approx(list(ds.preprocessing.std))
    assert _display_norm([], 0.5, 0.25)[1].item() == 0.25
