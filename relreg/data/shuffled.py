"""``ShuffledLabels``: a dataset whose labels are permuted with a seed, for the label-randomisation
sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): a model trained on
it has learnt nothing about the images that the labels describe, so an explanation method whose
maps look the same for it as for the real model does not explain the model."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from relreg.data.sample import Sample

__all__ = ["ShuffledLabels"]


class ShuffledLabels(Dataset):
    """Wrap ``dataset`` and give sample ``i`` the label of sample ``perm[i]``.

    The permutation is drawn once from ``seed`` over the whole dataset, so the label counts are
    unchanged and every epoch sees the same (wrong) labels. Images, masks and every other key are
    the wrapped dataset's.

    Args:
        dataset: any dataset yielding :class:`relreg.data.Sample` dicts.
        seed: seed of the permutation.

    Attributes:
        perm: ``(N,)`` long, the permutation.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        gen = torch.Generator().manual_seed(int(seed))
        self.perm = torch.randperm(len(dataset), generator=gen)
        self._labels: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def _label(self, index: int) -> torch.Tensor:
        if index not in self._labels:
            self._labels[index] = torch.as_tensor(self.dataset[index]["label"])
        return self._labels[index]

    def __getitem__(self, index: int) -> Sample:
        sample = dict(self.dataset[index])
        sample["label"] = self._label(int(self.perm[index]))
        return sample
