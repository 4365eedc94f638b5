"""Localization metrics against naive per-image references (numpy / scikit-learn) and DDP merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from relreg.metrics import (
    PointingGame,
    RelevanceMass,
    RelevanceRankAccuracy,
    SegmentationAgreement,
    pointing_game,
    relevance_mass,
    relevance_rank_accuracy,
    segmentation_agreement,
)


def _data(b=6, seed=0, grid=7, size=28):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(b, grid, grid, generator=g)
    masks = torch.zeros(b, size, size)
    for i in range(b):
        y, x = torch.randint(0, size - 10, (2,), generator=g).tolist()
        masks[i, y : y + 10, x : x + 12] = 1
    return maps, masks


def _naive_pixels(m, size, normalize=True):
    up = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    return (up - up.min()) / max(up.max() - up.min(), 1e-8) if normalize else up


def test_per_image_metrics_match_naive_loops():
    maps, masks = _data()
    maps = maps - 0.3  # some negative relevance, which the published relevance mass ignores
    mass, mass_minmax, rank, point = [], [], [], []
    for m, s in zip(maps, masks, strict=True):
        raw = np.maximum(_naive_pixels(m, s.shape, normalize=False), 0)
        r, s = _naive_pixels(m, s.shape), s.numpy()
        mass.append((raw * s).sum() / raw.sum())
        mass_minmax.append((r * s).sum() / r.sum())
        k = int(s.sum())
        top = np.argsort(-r.ravel(), kind="stable")[:k]
        rank.append(s.ravel()[top].mean())
        point.append(s.ravel()[r.argmax()])
    assert relevance_mass(maps, masks).item() == pytest.approx(np.mean(mass), rel=1e-5)
    minmax = relevance_mass(maps, masks, convention="minmax").item()
    assert minmax == pytest.approx(np.mean(mass_minmax), rel=1e-5)
    assert RelevanceMass(convention="minmax")(maps, masks).item() == pytest.approx(minmax)
    assert abs(minmax - np.mean(mass)) > 1e-3  # the two conventions are different numbers
    assert relevance_rank_accuracy(maps, masks).item() == pytest.approx(np.mean(rank), rel=1e-5)
    assert pointing_game(maps, masks).item() == pytest.approx(np.mean(point))


def test_segmentation_matches_naive_and_sklearn():
    maps, masks = _data(b=5, seed=3)
    correct = total = 0
    inter, union, aps = np.zeros(2), np.zeros(2), []
    for m, s in zip(maps, masks, strict=True):
        r, s = _naive_pixels(m, s.shape), s.numpy().astype(bool)
        pred = r > r.mean()
        correct += (pred == s).sum()
        total += s.size
        for c, (p, t) in enumerate(((~pred, ~s), (pred, s))):
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
        aps.append(average_precision_score(s.ravel(), r.ravel()))
    out = segmentation_agreement(maps, masks)
    assert out["pixel_accuracy"].item() == pytest.approx(correct / total, rel=1e-6)
    assert out["miou"].item() == pytest.approx((inter / union).mean(), rel=1e-6)
    assert out["map"].item() == pytest.approx(np.mean(aps), rel=1e-5)


@pytest.mark.parametrize(
    "cls", [RelevanceMass, RelevanceRankAccuracy, PointingGame, SegmentationAgreement]
)
def test_merged_states_equal_one_pass(cls):
    # what DDP does with sum states: two ranks' states merged give the result over all data
    maps, masks = _data(b=8, seed=5)
    whole, a, b = cls(), cls(), cls()
    whole.update(maps, masks)
    a.update(maps[:3], masks[:3])
    b.update(maps[3:], masks[3:])
    a.merge_state(b)
    got, want = a.compute(), whole.compute()
    if isinstance(want, dict):
        for k in want:
            torch.testing.assert_close(got[k], want[k])
    else:
        torch.testing.assert_close(got, want)
    assert cls.full_state_update is False and cls.higher_is_better is True


def test_metric_equals_functional_and_skips_unmasked():
    maps, masks = _data()
    metric = RelevanceMass()
    has = torch.tensor([True, False, True, True, False, True])
    metric.update(maps, masks, has_mask=has)
    torch.testing.assert_close(metric.compute(), relevance_mass(maps[has], masks[has]))
    empty = PointingGame()
    empty.update(maps, masks, has_mask=torch.zeros(6, dtype=torch.bool))
    assert empty.compute().item() == 0.0


def test_perfect_and_inverted_maps():
    masks = torch.zeros(2, 8, 8)
    masks[:, 2:6, 2:6] = 1
    perfect, inverted = masks.clone(), 1 - masks
    assert (
        relevance_mass(perfect, masks).item() == 1.0
        and relevance_mass(inverted, masks).item() == 0.0
    )
    assert pointing_game(perfect, masks).item() == 1.0
    seg = segmentation_agreement(perfect, masks)
    assert all(v.item() == 1.0 for v in seg.values())
    assert segmentation_agreement(inverted, masks)["pixel_accuracy"].item() == 0.0


def test_relevance_mass_conventions_on_a_uniform_floor():
    # relevance 1 on the 16-pixel object plus a floor f everywhere (64 pixels): the published share
    # counts the floor, (1 + f) * 16 / (1 * 16 + f * 64); min-max removes it and gives 1
    masks = torch.zeros(1, 8, 8)
    masks[:, 2:6, 2:6] = 1
    for f in (0.0, 0.25, 1.0):
        maps = masks + f
        expected = (1 + f) * 16 / (16 + f * 64)
        assert relevance_mass(maps, masks).item() == pytest.approx(expected)
        assert relevance_mass(maps, masks, convention="minmax").item() == pytest.approx(1.0)
        assert relevance_mass(3.0 * maps, masks).item() == pytest.approx(expected)  # scale-free
    assert relevance_mass(-masks, masks).item() == 0.0  # no positive relevance at all


def test_relevance_mass_convention_is_checked():
    with pytest.raises(
        ValueError, match=r"convention to be one of \('positive', 'minmax'\), but got 'max'"
    ):
        RelevanceMass(convention="max")
    with pytest.raises(ValueError, match="convention"):
        relevance_mass(torch.rand(1, 2, 2), torch.ones(1, 4, 4), convention="abs")


@pytest.mark.parametrize(
    "maps, masks, match",
    [
        (torch.rand(2, 4, 4), torch.rand(3, 8, 8).round(), "same B"),
        (torch.rand(4, 4), torch.rand(4, 4).round(), r"maps \(B, h, w\)"),
        (torch.rand(2, 4, 4), torch.full((2, 8, 8), 0.5), "binary masks"),
        (torch.full((2, 4, 4), float("nan")), torch.zeros(2, 8, 8), "finite maps"),
    ],
)
def test_input_errors(maps, masks, match):
    with pytest.raises(ValueError, match=match):
        RelevanceMass().update(maps, masks)
