"""RobustViT's ImageNet-S selection on a generated tree: order, merged classes, counts, masks."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from relreg.cli import main
from relreg.data import MaskedImageFolder, label_space
from relreg.data.files import load_mask
from relreg.data.imagenet_s import MERGED_WNIDS, imagenet_s_selection, write_imagenet_s_subset
from tests.trees import imagenet_s_tree

# 7 ImageNet wnids (sorted: a fixed expected order), plus two merged classes that must be skipped
WNIDS = sorted(list(label_space("imagenet"))[:7])
MERGED = ["n04355933", "n02808440"]


def _tree(root, files_per_class=4, several_ids=False):
    return imagenet_s_tree(root, WNIDS + MERGED, files_per_class, several_ids)


def test_selection_follows_robustvit_with_sorted_listings(tmp_path):
    masks, _ = _tree(tmp_path)
    train = imagenet_s_selection(masks, "train", train_classes=5)
    val = imagenet_s_selection(masks, "val", train_classes=5)
    assert not {w for w, _ in train + val} & MERGED_WNIDS
    assert train == [(w, f"{w}_{j}") for w in WNIDS[:5] for j in range(3)]  # 3 per class
    assert val == [(w, f"{w}_0") for w in WNIDS[5:]]  # the rest, 1 per class
    shuffled = WNIDS.copy()
    random.Random(7).shuffle(shuffled)
    seeded = imagenet_s_selection(masks, "train", 2, train_classes=3, class_seed=7)
    assert seeded == [(w, f"{w}_{j}") for w in shuffled[:3] for j in range(2)]
    assert seeded == imagenet_s_selection(masks, "train", 2, train_classes=3, class_seed=7)


def test_written_subset_loads_as_a_masked_folder(tmp_path):
    masks, images = _tree(tmp_path, several_ids=True)
    report = write_imagenet_s_subset(masks, images, tmp_path / "out", "train", train_classes=5)
    assert report["classes"] == 5 and len(report["pairs"]) == 15
    assert len(report["masks_with_several_ids"]) == 5  # kept, counted, not fatal
    assert json.loads((tmp_path / "out" / "selection.json").read_text()) == report
    ds = MaskedImageFolder(
        tmp_path / "out", train=False, img_size=8, mask_format="imagenet_s", classes="imagenet"
    )
    assert len(ds) == 15 and ds.class_to_idx == {w: label_space("imagenet")[w] for w in WNIDS[:5]}
    assert set(ds[0]["mask"].unique().tolist()) == {0.0, 1.0}
    raw = load_mask(ds.samples[0][1], "imagenet_s")  # n..._0: the object and a second class id
    assert raw.sum() == 16 + 1  # both are foreground, "ignore" (1000) is background
    with pytest.raises(FileExistsError, match="exists"):
        write_imagenet_s_subset(masks, images, tmp_path / "out")


def test_prepare_command_checks_everything_before_writing(tmp_path, capsys):
    masks, images = _tree(tmp_path)
    (images / WNIDS[6] / f"{WNIDS[6]}_0.JPEG").unlink()  # a validation image is missing
    args = ["prepare", "imagenet-s", "--masks", str(masks), "--images", str(images)]
    assert main([*args, "--out", str(tmp_path / "o"), "--train-classes", "5"]) == 2
    assert f"{WNIDS[6]}_0.JPEG" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written, the training part neither
    Image.new("RGB", (8, 8)).save(images / WNIDS[6] / f"{WNIDS[6]}_0.JPEG")
    assert main([*args, "--out", str(tmp_path / "o"), "--train-classes", "5"]) == 0
    assert "train: 15 images of 5 classes" in capsys.readouterr().out
    assert len(list((tmp_path / "o" / "val" / "masks").rglob("*.png"))) == 2


def test_empty_partition_and_bad_mask_are_errors_before_writing(tmp_path):
    masks, images = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"'val' partition, but it is empty: 7 classes"):
        imagenet_s_selection(masks, "val", train_classes=7)
    (masks / WNIDS[0] / f"{WNIDS[0]}_0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=rf"ImageNet-S mask .*{WNIDS[0]}_0\.png"):
        write_imagenet_s_subset(masks, images, tmp_path / "out", "train", train_classes=5)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
