"""Waterbirds in its native layout (a generated tree: metadata.csv, CUB species folders, soft CUB
segmentations), group- and class-balanced sampling, and the errors of a wrong root."""

from __future__ import annotations

import collections

import pytest
import torch

from relreg.data import BalancedSampler, RelRegDataModule, SpuriousShapes, Waterbirds
from tests.trees import WATERBIRDS_GROUPS, waterbirds_tree


@pytest.fixture
def tree(tmp_path):
    return waterbirds_tree(tmp_path)


def test_splits_labels_places_and_groups_follow_metadata(tree):
    data, segs = tree
    counts = {"train": (3, 2, 1, 2), "val": (2, 2, 2, 2), "test": (2, 2, 2, 2)}
    for split, expected in counts.items():
        ds = Waterbirds(data, split, masks=segs, img_size=16, preprocessing="robustvit")
        assert torch.bincount(ds.groups, minlength=4).tolist() == list(expected)
        for i in range(len(ds)):
            y, place = WATERBIRDS_GROUPS[int(ds.groups[i])]
            assert (int(ds.labels[i]), int(ds.places[i])) == (y, place)
        sample = ds[0]
        assert sample["group"] == ds.groups[0] and sample["label"] == ds.labels[0]
        assert sample["image"].shape == (3, 16, 16) and bool(sample["has_mask"])
    assert Waterbirds.num_groups == 4 and Waterbirds.classes == ["landbird", "waterbird"]


def test_soft_masks_are_binarised_at_the_threshold(tree):
    data, segs = tree
    eval_ds = Waterbirds(data, "val", masks=segs, train=False, transform=lambda i, m: (i, m))
    mask = eval_ds[0]["mask"]
    assert mask.sum() == 64  # the 8 x 8 core (255); the rim (100 / 255 = 0.39) is dropped
    low = Waterbirds(data, "val", masks=segs, mask_threshold=0.3, transform=lambda i, m: (i, m))
    assert low[0]["mask"].sum() == 100  # the 10 x 10 square with its rim
    bare = Waterbirds(data, "val", transform=lambda i, m: (i, m))
    assert not bool(bare[0]["has_mask"]) and bare[0]["mask"].sum() == 0


def test_a_wrong_root_or_split_is_named(tree, tmp_path):
    data, segs = tree
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        Waterbirds(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="Expected split one of"):
        Waterbirds(data, "validation")
    with pytest.raises(FileNotFoundError, match="segmentations folder"):
        Waterbirds(data, masks=tmp_path / "nope")
    next(data.rglob("*.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match="1 are missing"):
        for split in ("train", "val", "test"):
            Waterbirds(data, split)


def test_group_balanced_sampling_draws_each_group_equally_often(tree):
    data, _ = tree
    ds = Waterbirds(data, "train", img_size=16, preprocessing="robustvit")
    sampler = BalancedSampler(ds, "group", seed=0)
    drawn = collections.Counter()
    for epoch in range(400):
        sampler.set_epoch(epoch)
        drawn.update(int(ds.groups[i]) for i in sampler)
    shares = [drawn[g] / sum(drawn.values()) for g in range(4)]
    assert all(abs(s - 0.25) < 0.02 for s in shares)  # 3200 draws: std of a share ~0.008
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first  # a function of (seed, epoch)
    by_class = BalancedSampler(ds, "class")
    labels = collections.Counter()
    for epoch in range(400):
        by_class.set_epoch(epoch)
        labels.update(int(ds.labels[i]) for i in by_class)
    assert abs(labels[0] / sum(labels.values()) - 0.5) < 0.03  # the classes hold 5 and 3


def test_the_data_module_balances_on_request_and_refuses_a_dataset_without_groups(tree):
    data, _ = tree
    ds = Waterbirds(data, "train", img_size=16, preprocessing="robustvit")
    module = RelRegDataModule(train=ds, batch_size=2, balance="group")
    assert isinstance(module.train_dataloader().sampler, BalancedSampler)
    shapes = SpuriousShapes(split="train", n=8)
    assert isinstance(
        RelRegDataModule(train=shapes, balance="group").train_dataloader().sampler, BalancedSampler
    )
    with pytest.raises(ValueError, match="Expected balance one of"):
        RelRegDataModule(train=ds, balance="groups")
    from relreg.data import MaskedImageFolder  # noqa: F401  (folders have labels only)

    with pytest.raises(ValueError, match="with 'groups' for balance='group'"):
        RelRegDataModule(train=torch.utils.data.TensorDataset(torch.zeros(2)), balance="group")
