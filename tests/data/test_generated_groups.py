"""The generated benchmarks' groups: label x the class the background cue points to."""

from __future__ import annotations

import torch

from relreg.data import SpuriousShapes


def test_shapes_groups_are_label_times_cue_and_a_biased_split_is_mostly_agreeing():
    ds = SpuriousShapes(split="train", n=400, spurious=0.9)
    groups = torch.stack([ds[i]["group"] for i in range(len(ds))])
    labels, cues = groups // ds.num_cues, groups % ds.num_cues
    assert ds.num_groups == 16 and torch.equal(labels, ds.labels) and torch.equal(cues, ds.cues)
    agree = (labels == cues).float().mean().item()
    assert 0.85 < agree < 0.95  # spurious=0.9 plus the chance agreements of the rest
    ood = SpuriousShapes(split="ood", n=200)
    ood_groups = torch.stack([ood[i]["group"] for i in range(len(ood))])
    assert not (ood_groups // ood.num_cues == ood_groups % ood.num_cues).any()
