"""``relreg evaluate`` on the field's benchmarks in their native layouts: Waterbirds (detected
from metadata.csv) reports worst- and average-group accuracy, an ImageNet-9 root given to
``--ood`` becomes its eight variations and the BG-gap; all against values computed by hand from
the model's own predictions on the generated trees."""

from __future__ import annotations

import json

import torch
from torch.utils.data import DataLoader

from relreg.cli import main
from relreg.data import ImageNet9, Waterbirds
from relreg.data.imagenet9 import VARIATIONS
from relreg.metrics import group_accuracy
from relreg.models import build_model
from tests.trees import imagenet9_tree, waterbirds_tree

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}


def _arch(num_classes: int) -> list[str]:
    return ["--model", "vit_tiny_patch16_224", "--num-classes", str(num_classes),
            "--model-kwargs", json.dumps(TINY)]  # fmt: skip


def _weights(tmp_path, num_classes: int):
    torch.manual_seed(num_classes)
    model = build_model("vit_tiny_patch16_224", num_classes=num_classes, **TINY).eval()
    with torch.no_grad():
        model.head.weight.mul_(50)  # spread the random predictions over the classes
    torch.save(model.state_dict(), tmp_path / f"w{num_classes}.pt")
    return model, tmp_path / f"w{num_classes}.pt"


def _predictions(model, dataset):
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    with torch.no_grad():
        return model(batch["image"]), batch


QUICK = [
    "--methods",
    "rollout",
    "--steps",
    "1",
    "--num-heatmaps",
    "0",
    "--preprocessing",
    "robustvit",
]


def test_waterbirds_reports_group_accuracies_computed_by_hand(tmp_path, capsys):
    data, _ = waterbirds_tree(tmp_path / "wb")
    model, weights = _weights(tmp_path, 2)
    out = tmp_path / "report"
    args = ["evaluate", "--checkpoint", str(weights), *_arch(2), "--data", str(data), *QUICK]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    entry = next(iter(report["models"].values()))
    test = Waterbirds(data, "test", train=False, img_size=32, preprocessing="robustvit")
    logits, batch = _predictions(model, test)
    expected = group_accuracy(logits, batch["label"], batch["group"], 4)
    assert entry["groups"]["data"]["worst_group_acc"] == round(
        expected["worst_group_accuracy"].item(), 4
    )
    assert entry["groups"]["data"]["average_group_acc"] == round(
        expected["average_group_accuracy"].item(), 4
    )
    assert entry["n_masked"] == len(test)  # CUB's segmentations found beside the data
    assert "groups of data: worst_group_acc" in capsys.readouterr().out


def test_an_imagenet9_root_gives_every_variation_and_the_bg_gap(tmp_path, capsys):
    root = imagenet9_tree(tmp_path / "bg_challenge", size=32)
    model, weights = _weights(tmp_path, 9)
    out = tmp_path / "report"
    args = ["evaluate", "--checkpoint", str(weights), *_arch(9), "--data", "scenes:ood:2"]
    # the main split is a generated one: the OOD accuracies are what is checked here
    code = main([*args, "--ood", f"in9={root}", *QUICK, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    entry = next(iter(report["models"].values()))
    accuracy = {}
    for variation in VARIATIONS:
        ds = ImageNet9(root, variation, num_classes=9, img_size=32, preprocessing="robustvit")
        logits, batch = _predictions(model, ds)
        accuracy[variation] = (logits.argmax(1) == batch["label"]).float().mean().item()
        assert entry["accuracy"][f"in9/{variation}"] == round(accuracy[variation], 4)
    assert entry["bg_gap"]["in9"] == round(
        round(accuracy["mixed_same"], 4) - round(accuracy["mixed_rand"], 4), 4
    )
    assert "BG-gap of in9 (mixed_same - mixed_rand)" in capsys.readouterr().out
