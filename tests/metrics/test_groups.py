"""Group accuracies against a per-sample loop, their edge cases and errors, and the torchmetrics
twin's exactness under DDP (2 gloo processes, uneven shards)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from relreg.metrics import GroupAccuracy, group_accuracy
from tests.ddp import run_two_ranks


def loop_reference(preds, target, groups, num_groups):
    """Per-sample loop: a list of accuracies per group (None for empty ones)."""
    per = []
    for g in range(num_groups):
        hits = [
            int(p == t)
            for p, t, k in zip(preds.tolist(), target.tolist(), groups.tolist(), strict=True)
            if k == g
        ]
        per.append(sum(hits) / len(hits) if hits else None)
    seen = [a for a in per if a is not None]
    return per, min(seen), sum(seen) / len(seen)


def random_batch(n=200, k=3, num_groups=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g)
    target = torch.randint(0, k, (n,), generator=g)
    groups = torch.randint(0, num_groups - 1, (n,), generator=g)  # the last group stays empty
    return logits, target, groups


def test_group_accuracy_equals_a_per_sample_loop():
    logits, target, groups = random_batch()
    out = group_accuracy(logits, target, groups, 5)
    per, worst, average = loop_reference(logits.argmax(-1), target, groups, 5)
    for got, expected in zip(out["group_accuracy"].tolist(), per, strict=True):
        assert math.isnan(got) if expected is None else got == pytest.approx(expected)
    assert out["worst_group_accuracy"].item() == pytest.approx(worst)
    assert out["average_group_accuracy"].item() == pytest.approx(average)


def test_the_metric_accumulates_batches_to_the_whole_splits_value():
    logits, target, groups = random_batch(seed=1)
    metric = GroupAccuracy(5)
    for i in range(0, 200, 37):
        metric.update(logits[i : i + 37], target[i : i + 37], groups[i : i + 37])
    whole = group_accuracy(logits, target, groups, 5)
    out = metric.compute()
    torch.testing.assert_close(out["group_accuracy"], whole["group_accuracy"], equal_nan=True)
    assert out["worst_group_accuracy"] == whole["worst_group_accuracy"]
    metric.reset()
    assert math.isnan(metric.compute()["worst_group_accuracy"])


def test_worst_group_is_the_minority_the_majority_rule_fails():
    # a classifier that predicts the majority group's label: right on the majority, wrong elsewhere
    target = torch.tensor([0] * 90 + [1] * 10)
    groups = torch.tensor([0] * 90 + [1] * 10)
    out = group_accuracy(torch.zeros(100, dtype=torch.long), target, groups, 2)
    assert out["worst_group_accuracy"] == 0.0 and out["average_group_accuracy"] == 0.5
    assert (torch.zeros(100, dtype=torch.long) == target).float().mean() == 0.9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]), 2),
            "Expected groups in \\[0, 2\\), but got values from 0 to 2",
        ),
        (
            (
                torch.zeros(3, 2),
                torch.zeros(2, dtype=torch.long),
                torch.zeros(3, dtype=torch.long),
                2,
            ),
            "Expected preds \\(B,\\) or \\(B, K\\) matching target",
        ),
        (
            (
                torch.zeros(3, 2),
                torch.zeros(3, dtype=torch.long),
                torch.zeros(2, dtype=torch.long),
                2,
            ),
            "Expected correct and groups of one shape",
        ),
        (
            (
                torch.zeros(3, 2),
                torch.zeros(3, dtype=torch.long),
                torch.zeros(3, dtype=torch.long),
                0,
            ),
            "Expected num_groups to be a positive int",
        ),
    ],
)
def test_bad_input_is_named(args, message):
    with pytest.raises(ValueError, match=message):
        group_accuracy(*args)


def _rank(rank: int, out: str) -> None:
    logits, target, groups = random_batch(n=203, seed=2)
    shard = slice(0, 120) if rank == 0 else slice(120, 203)  # uneven shards
    metric = GroupAccuracy(5)
    metric.update(logits[shard], target[shard], groups[shard])
    result = metric.compute()
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_exact_under_ddp_with_two_processes(tmp_path):
    run_two_ranks(_rank, str(tmp_path))
    logits, target, groups = random_batch(n=203, seed=2)
    whole = group_accuracy(logits, target, groups, 5)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["group_accuracy"], whole["group_accuracy"], equal_nan=True)
        assert got["worst_group_accuracy"] == whole["worst_group_accuracy"]
        assert got["average_group_accuracy"] == whole["average_group_accuracy"]


def test_dataset_scores_add_group_accuracies_for_a_dataset_with_groups():
    from torch.utils.data import DataLoader

    from relreg.data import SpuriousShapes
    from relreg.metrics import dataset_scores
    from tests.conftest import make_tiny_vit

    model = make_tiny_vit(img_size=32, patch_size=8, num_classes=4)
    ds = SpuriousShapes(split="val", n=40)
    scores = dataset_scores(model, ds, batch_size=16)
    batch = next(iter(DataLoader(ds, batch_size=40)))
    with torch.no_grad():
        logits = model(batch["image"])
    expected = group_accuracy(logits, batch["label"], batch["group"], ds.num_groups)
    assert scores["worst_group_acc"] == pytest.approx(expected["worst_group_accuracy"].item())
    assert scores["average_group_acc"] == pytest.approx(expected["average_group_accuracy"].item())
    assert scores["acc"] == pytest.approx(
        (logits.argmax(1) == batch["label"]).float().mean().item()
    )
