"""One accuracy loop (metrics.accuracy) for RelRegModule, OODEvaluation and relreg evaluate."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from relreg.metrics import dataset_accuracy, restrict_logits, score_logits, scoring_classes
from tests.conftest import make_tiny_vit


class _Split(Dataset):
    def __init__(self, n: int, scoring: str = "argmax", sets: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 16, 16, generator=g)
        self.labels = torch.randint(0, 5, (n,), generator=g)
        self.sets = torch.randint(0, 5, (n, 2), generator=g) if sets else None
        self.scoring, self.split_classes = scoring, torch.tensor([1, 3, 4])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        sample = {"image": self.images[i], "label": self.labels[i]}
        if self.sets is not None:
            sample["label_set"] = self.sets[i]
        return sample


@pytest.mark.parametrize(
    "scoring, sets", [("argmax", False), ("restricted", False), ("argmax", True)]
)
def test_dataset_accuracy_equals_a_per_image_loop(scoring, sets):
    model, split = make_tiny_vit(), _Split(11, scoring, sets)
    right = 0
    for i in range(len(split)):
        with torch.no_grad():
            logits = model(split.images[i : i + 1])[0]
        if scoring == "restricted":
            keep = torch.full_like(logits, float("-inf"))
            keep[split.split_classes] = 0
            logits = logits + keep
        pred = int(logits.argmax())
        ok = pred in split.sets[i].tolist() if sets else pred == int(split.labels[i])
        right += ok
    ticks = []
    acc = dataset_accuracy(model, split, batch_size=4, on_batch=lambda: ticks.append(1))
    assert acc == pytest.approx(right / len(split))
    assert len(ticks) == 3  # ceil(11 / 4) batches


def test_scoring_is_read_from_the_dataset_once():
    assert scoring_classes(_Split(2)) is None
    assert torch.equal(scoring_classes(_Split(2, "restricted")), torch.tensor([1, 3, 4]))
    assert scoring_classes(object()) is None
    logits = torch.randn(2, 5)
    assert score_logits(logits, None) is logits
    restricted = score_logits(logits, torch.tensor([1, 3]))
    torch.testing.assert_close(restricted, restrict_logits(logits, torch.tensor([1, 3])))
    assert set(restricted.argmax(1).tolist()) <= {1, 3}
