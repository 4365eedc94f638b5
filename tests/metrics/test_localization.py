"""Localization metrics against naive per-image references (numpy / scikit-learn) and DDP
merging."""

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
    relevance_share,
    segmentation_agreement,
)
from tests.numerics import U32, U64, assert_within, probable_sum_bound


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


def _share_bound(m, s, minmax):
    """Bound on the float32 error of one image's share ``sum(r * s) / sum(r)`` of its upsampled
    map ``r`` (min-max normalised, or its positive part), as computed here and by the metric."""
    m, s = m.double(), s.double()
    up = F.interpolate(m[None, None], size=s.shape, mode="bilinear", align_corners=False)[0, 0]
    # bilinear: 4 terms with rounded weights, relative to the same sum of |terms|
    size = F.interpolate(m.abs()[None, None], size=s.shape, mode="bilinear", align_corners=False)
    err = 4 * U32 * size[0, 0]
    if minmax:  # (up - min) / (max - min): the minimum's error too, a subtraction, a division
        lo, span = up.min(), up.max() - up.min()
        r = (up - lo) / span
        err = (err + err.max()) / span + 2 * U32 * r
    else:
        r = up.clamp(min=0)
    num, den = (r * s).sum(), r.sum()
    # sums of hundreds of terms: the probable bound (the worst case would hide wrong shares)
    e_num = probable_sum_bound(r * s) + (err * s).sum()
    e_den = probable_sum_bound(r) + err.sum()
    return (e_num + num / den * e_den) / den + U32 * num / den


def _mean_bound(values, bounds):
    """Bound on two float32 means of per-image values each within ``bounds``: the values' errors
    (both sides), and each side's float32 mean (a sum of ``len(values)`` terms)."""
    values, bounds = torch.as_tensor(values).double(), torch.as_tensor(bounds).double()
    return 2 * bounds.mean() + 2 * probable_sum_bound(values) / len(values)


def test_per_image_metrics_match_naive_loops():
    maps, masks = _data()
    maps = maps - 0.3  # some negative relevance, which the published relevance mass ignores
    mass, mass_minmax, rank, point = [], [], [], []
    mass_bounds, minmax_bounds = [], []
    for m, s in zip(maps, masks, strict=True):
        mass_bounds.append(_share_bound(m, s, minmax=False))
        minmax_bounds.append(_share_bound(m, s, minmax=True))
        raw = np.maximum(_naive_pixels(m, s.shape, normalize=False), 0)
        r, s = _naive_pixels(m, s.shape), s.numpy()
        mass.append((raw * s).sum() / raw.sum())
        mass_minmax.append((r * s).sum() / r.sum())
        k = int(s.sum())
        top = np.argsort(-r.ravel(), kind="stable")[:k]
        rank.append(s.ravel()[top].mean())
        point.append(s.ravel()[r.argmax()])
    # each image's share summed and divided in float32 here and there, then averaged
    want = torch.tensor(np.mean(mass))
    assert_within(relevance_mass(maps, masks), want, _mean_bound(mass, mass_bounds), "mass")
    minmax = relevance_mass(maps, masks, convention="minmax")
    want = torch.tensor(np.mean(mass_minmax))
    assert_within(minmax, want, _mean_bound(mass_minmax, minmax_bounds), "minmax")
    # the metric's float64 mean of the shares against the function's float32 one
    shares = relevance_share(maps, masks, convention="minmax")
    bound = probable_sum_bound(shares) / len(shares) + U32 * minmax.abs()
    assert_within(RelevanceMass(convention="minmax")(maps, masks), minmax, bound, "class")
    assert abs(minmax.item() - np.mean(mass)) > 1e-3  # the two conventions are different numbers
    # counts of mask pixels (exact) divided by K once, then averaged
    want, rank = torch.tensor(np.mean(rank)), torch.tensor(rank)
    bound = _mean_bound(rank, U32 * rank)
    assert_within(relevance_rank_accuracy(maps, masks), want, bound, "rank")
    # hits (0 or 1) averaged: an exact count divided once on each side
    want = torch.tensor(np.mean(point), dtype=torch.float64)
    assert_within(pointing_game(maps, masks), want, 2 * U32 * want, "pointing")


def test_segmentation_matches_naive_and_sklearn():
    maps, masks = _data(b=5, seed=3)
    correct = total = 0
    inter, union, aps, ap_bounds = np.zeros(2), np.zeros(2), [], []
    for m, s in zip(maps, masks, strict=True):
        r, s = _naive_pixels(m, s.shape), s.numpy().astype(bool)
        pred = r > r.mean()
        correct += (pred == s).sum()
        total += s.size
        for c, (p, t) in enumerate(((~pred, ~s), (pred, s))):
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
        aps.append(average_precision_score(s.ravel(), r.ravel()))
        # the metric's AP: a float32 sum of one nonneg term per positive pixel, a division
        ap_bounds.append((4 * s.sum() + 1) * U32 * aps[-1])
    out = segmentation_agreement(maps, masks)
    # float64 counts and ratios (here too), rounded once to float32
    want = torch.tensor(correct / total, dtype=torch.float64)
    assert_within(out["pixel_accuracy"], want, U32 * want + 2 * U64 * want, "pixel accuracy")
    want = torch.tensor((inter / union).mean())
    assert_within(out["miou"], want, U32 * want + 8 * U64 * want, "miou")
    # each AP in float32 against scikit-learn's float64, their float64 mean rounded to float32
    want = torch.tensor(np.mean(aps))
    assert_within(out["map"], want, np.mean(ap_bounds) + U32 * want + 8 * U64 * want, "map")


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
        # sums of a few exactly representable values (exact), then one rounding in the division
        assert abs(relevance_mass(maps, masks).item() - expected) <= U32 * expected
        assert relevance_mass(maps, masks, convention="minmax").item() == 1.0  # (1 * 16) / 16
        assert abs(relevance_mass(3.0 * maps, masks).item() - expected) <= U32 * expected
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
