"""OOD folders whose classes stand for several model classes (ObjectNet-style): a prediction of any
of them is right, in relreg evaluate, in RelRegModule's OOD logging and in OODEvaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy

from relreg.data import (
    MaskedImageFolder,
    OODImageFolder,
    RelRegDataModule,
    SpuriousShapes,
    class_sets,
    write_shapes_folder,
)
from relreg.evaluation import evaluate_models
from relreg.lightning import OODEvaluation, RelRegModule, connect
from relreg.metrics import accuracy_targets

TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)
SETS = {"circle": [0, 2], "square": [1], "triangle": [3, 0]}


def _folder(tmp_path):
    root = tmp_path / "ood"
    rng = np.random.default_rng(0)
    for name in SETS:
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_accuracy_targets_equal_a_naive_membership_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 5, generator=g)
    sets = torch.randint(0, 5, (50, 2), generator=g)
    sets[::3, 1] = -1  # padding
    batch = {"label": sets[:, 0], "label_set": sets}
    naive = np.mean([int(logits[i].argmax()) in sets[i].tolist() for i in range(50)])
    metric = MulticlassAccuracy(5, average="micro")
    assert float(metric(logits, accuracy_targets(logits, batch))) == pytest.approx(naive)
    plain = {"label": sets[:, 0]}
    assert torch.equal(accuracy_targets(logits, plain), sets[:, 0])


def test_ood_folder_carries_padded_label_sets_and_the_union_as_split_classes(tmp_path):
    ds = OODImageFolder(_folder(tmp_path), classes=SETS, img_size=32)
    by_folder = {}
    for i in range(len(ds)):
        sample = ds[i]
        by_folder[sample["path"].split("/")[-2]] = sample["label_set"].tolist()
    assert by_folder == {"circle": [0, 2], "square": [1, -1], "triangle": [3, 0]}
    assert ds.split_classes.tolist() == [0, 1, 2, 3]
    one = OODImageFolder(_folder(tmp_path / "b"), classes={k: v[0] for k, v in SETS.items()})
    assert "label_set" not in one[0]


def test_class_sets_from_json_and_errors(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps(SETS))
    assert class_sets(["circle", "square"], tmp_path / "map.json") == {
        "circle": (0, 2),
        "square": (1,),
    }
    for bad in ({"circle": []}, {"circle": [-1]}, {"circle": [True]}, {"circle": "x"}):
        with pytest.raises(ValueError, match="Expected class 'circle' to map to an index"):
            class_sets(["circle"], bad)
    root = write_shapes_folder(tmp_path / "masked", "val", n=8, size=32, num_classes=3)
    with pytest.raises(ValueError, match="one class index per folder for training data"):
        MaskedImageFolder(root, classes=SETS, img_size=32)


def _model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **TINY).eval()


def _naive_accuracy(model, ds) -> float:
    hits = []
    for i in range(len(ds)):
        s = ds[i]
        pred = int(model(s["image"][None]).argmax())
        hits.append(pred in s["label_set"].tolist())
    return float(np.mean(hits))


def test_evaluate_module_and_callback_count_any_class_of_the_set(tmp_path):
    model = _model()
    ds = OODImageFolder(_folder(tmp_path), classes=SETS, img_size=32)
    expected = _naive_accuracy(model, ds)
    single = OODImageFolder(
        _folder(tmp_path / "b"), classes={k: v[0] for k, v in SETS.items()}, img_size=32
    )
    assert expected != pytest.approx(_naive_accuracy_single(model, single))  # the sets matter here
    report = evaluate_models(
        {"m": model},
        SpuriousShapes("val", n=2),
        ["raw_attention"],
        ood={"objnet": ds},
        steps=1,
        progress=False,
    )
    assert report["models"]["m"]["accuracy"]["objnet"] == pytest.approx(expected, abs=1e-4)

    module = RelRegModule(model, explainer={"evaluate": False})
    callback = OODEvaluation({"objnet_cb": ds}, batch_size=5)
    dm = RelRegDataModule(val=SpuriousShapes("val", n=4), ood={"objnet": ds}, batch_size=5)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    connect(module, dm)
    results = {
        k: v for d in trainer.validate(module, datamodule=dm, verbose=False) for k, v in d.items()
    }
    assert results["ood/objnet/acc"] == pytest.approx(expected, abs=1e-6)
    assert callback.last["objnet_cb"] == pytest.approx(expected, abs=1e-6)


def _naive_accuracy_single(model, ds) -> float:
    return float(
        np.mean(
            [
                int(model(ds[i]["image"][None]).argmax()) == int(ds[i]["label"])
                for i in range(len(ds))
            ]
        )
    )


def test_yaml_mappings_lists_and_paths_reach_the_dataset_as_such(tmp_path):
    from jsonargparse import ActionConfigFile, ArgumentParser

    from relreg.data.classes import ClassesLike

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--classes", type=ClassesLike)
    for text, expected in [
        ("classes:\n  circle: [0, 2]\n  square: 1\n", {"circle": [0, 2], "square": 1}),
        ("classes: [circle, square]\n", ["circle", "square"]),
        ("classes: data/wnids.txt\n", "data/wnids.txt"),
    ]:
        (tmp_path / "c.yaml").write_text(text)
        assert parser.parse_args(["--config", str(tmp_path / "c.yaml")]).classes == expected
