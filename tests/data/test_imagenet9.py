"""ImageNet-9 in its native layout (a generated tree with every variation, the masks and the
mapping file), scored as the challenge's ``eval_model`` scores it, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from relreg.data import ImageNet9
from relreg.data.imagenet9 import IN9_CLASSES, VARIATIONS, bg_gap, in9_label_sets
from relreg.metrics import accuracy_targets
from tests.trees import imagenet9_tree


@pytest.fixture
def tree(tmp_path):
    return imagenet9_tree(tmp_path / "bg_challenge")


def identity(image, mask):
    return image, mask


@pytest.mark.parametrize("variation", VARIATIONS)
def test_every_variation_loads_with_its_masks(tree, variation):
    ds = ImageNet9(tree, variation, num_classes=9, transform=identity)
    assert len(ds) == 18 and ds.labels.tolist() == [k for k in range(9) for _ in range(2)]
    sample = ds[3]
    assert bool(sample["has_mask"]) and sample["mask"].sum() == 36  # the 6 x 6 object
    assert sample["label"] == 1 and "label_set" not in sample
    assert "wheeled vehicle" in ds.files[4].parent.name  # a folder name with a space


def test_a_1000_class_model_is_scored_as_the_challenge_scores_it(tree):
    ds = ImageNet9(tree, "mixed_rand", transform=identity)
    table = json.loads((tree / "in_to_in9.json").read_text())
    g = torch.Generator().manual_seed(0)
    batch = [ds[i] for i in range(len(ds))]
    batch = {
        "label": torch.stack([s["label"] for s in batch]),
        "label_set": torch.stack([s["label_set"] for s in batch]),
    }
    for _ in range(20):
        logits = torch.randn(len(ds), 1000, generator=g)
        logits[:, :60] += 3.0  # predictions among the first classes, mapped and unmapped ones
        ours = (logits.argmax(-1) == accuracy_targets(logits, batch)).float().mean()
        # the challenge: map the 1000-way argmax through the file, -1 is wrong
        mapped = torch.tensor([table[str(int(p))] for p in logits.argmax(-1)])
        theirs = (mapped == ds.labels).float().mean()
        assert ours == theirs


def test_label_sets_come_from_the_mapping_file(tree):
    sets = in9_label_sets(tree / "in_to_in9.json")
    assert len(sets) == len(IN9_CLASSES) and sets[0][:3] == [0, 10, 20]
    assert all(i % 10 != 9 for s in sets for i in s)  # the unmapped indices belong to no class


def test_missing_or_wrong_files_are_named(tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="in_to_in9.json"):
        ImageNet9(tree, "original", mapping=tmp_path / "none.json")
    with pytest.raises(ValueError, match="Expected variation one of"):
        ImageNet9(tree, "mixed")
    with pytest.raises(FileNotFoundError, match="variation folder"):
        ImageNet9(tmp_path, "original", num_classes=9)
    (tree / "original" / "val" / "08_fish").rename(tree / "original" / "val" / "08 fish")
    with pytest.raises(ValueError, match="Expected the 9 class folders"):
        ImageNet9(tree, "original", num_classes=9)


def test_bg_gap_is_mixed_same_minus_mixed_rand():
    assert bg_gap({"mixed_same": 0.9, "mixed_rand": 0.75, "original": 1.0}) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="mixed_rand"):
        bg_gap({"mixed_same": 0.9})
