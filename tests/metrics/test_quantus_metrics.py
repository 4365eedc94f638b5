"""Complexity (sparseness, complexity, effective complexity) and localisation (top-k intersection,
localization AUC) metrics against naive per-image references written from Quantus' code, against
scikit-learn's ROC AUC, and exact under DDP.

The references transcribe ``evaluate_batch`` of Quantus 0.6
(understandable-machine-intelligence-lab/Quantus: ``quantus/metrics/complexity/sparseness.py``,
``complexity.py``, ``effective_complexity.py``, ``quantus/metrics/localisation/
top_k_intersection.py``, ``auc.py``) with its preprocessing (``abs`` where the metric's default
has it, then ``normalise_by_max`` per sample), one image at a time in NumPy float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from relreg.metrics import (
    Complexity,
    EffectiveComplexity,
    LocalizationAUC,
    Sparseness,
    TopKIntersection,
    complexity,
    effective_complexity,
    localization_auc,
    metric_spec,
    sparseness,
    top_k_intersection,
)
from relreg.metrics.functional.complexity import (
    _complexity_update,
    _effective_complexity_update,
    _sparseness_update,
)
from relreg.metrics.registry import TOP_K
from tests.ddp import run_two_ranks
from tests.numerics import U32, U64


def _maps(n=6, size=12, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, size, size, generator=g, dtype=torch.float64)
    if ties:  # a few distinct values: ties everywhere
        maps = (maps * 2).round() / 2
    maps[0] = 0.0  # an all-zero map
    return maps


def _masks(n=6, size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(n, size, size, generator=g) > 0.6).double()
    masks[1] = 0.0  # an empty mask
    masks[2] = 1.0  # a full one
    return masks


def _by_max(a: np.ndarray) -> np.ndarray:
    """Quantus' ``normalise_by_max`` of one sample (all-zero left alone)."""
    return a if np.all(a == 0) else a / np.max(np.abs(a))


def ref_sparseness(a: np.ndarray) -> float:
    a = np.sort(_by_max(np.abs(a)).ravel() + 1e-7)
    n = a.size
    return float(((2 * np.arange(1, n + 1) - n - 1) * a).sum() / (n * a.sum()))


def ref_complexity(a: np.ndarray) -> float:
    a = _by_max(np.abs(a)).ravel()
    with np.errstate(invalid="ignore"):
        a = a / np.abs(a).sum()
    return float(-(a * np.log(a + 1e-12)).sum())  # NaN for an all-zero map, as in Quantus


def ref_effective_complexity(a: np.ndarray, eps: float = 1e-5) -> float:
    return float((_by_max(np.abs(a)).ravel() > eps).sum())


def ref_top_k(a: np.ndarray, s: np.ndarray, k: int) -> float:
    """Quantus' top-k intersection (``abs=False``), ties to the first pixel (relreg's order)."""
    a, s = _by_max(a).ravel(), s.ravel().astype(bool)
    if s.sum() == 0:
        return math.nan
    order = sorted(range(a.size), key=lambda i: -a[i])  # sorted() is stable
    return float(np.mean([s[i] for i in order[:k]]))


def _mean(values):
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept)


MAP_METRICS = [
    (sparseness, Sparseness, _sparseness_update, ref_sparseness),
    (complexity, Complexity, _complexity_update, ref_complexity),
    (
        effective_complexity,
        EffectiveComplexity,
        _effective_complexity_update,
        ref_effective_complexity,
    ),
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("fn", "cls", "per_image", "ref"), MAP_METRICS)
def test_complexity_metrics_equal_quantus_formulas_image_by_image(fn, cls, per_image, ref, ties):
    maps = _maps(ties=ties)
    expected = torch.tensor([ref(m.numpy()) for m in maps], dtype=torch.float64)
    # float64 sums of 144 terms in another order, a few roundings around them
    tol = 8 * maps[0].numel() * U64 * expected.nan_to_num().abs().max()
    torch.testing.assert_close(per_image(maps), expected, rtol=0, atol=tol, equal_nan=True)
    mean = float(expected[~expected.isnan()].mean())
    metric = cls()
    metric.update(maps[:4])
    metric.update(maps[4:])  # two batches: the same mean
    for result in (fn(maps), metric.compute()):  # float32: one more rounding
        assert result.dtype == torch.float32
        assert abs(float(result) - mean) <= tol + U32 * abs(mean)


def test_complexity_metrics_have_their_defining_extremes_and_ignore_scale_and_sign():
    n = 64
    one_hot = torch.zeros(1, 8, 8)
    one_hot[0, 3, 5] = 2.0
    uniform = torch.full((1, 8, 8), 0.3)
    assert float(sparseness(one_hot)) == pytest.approx((n - 1) / n, abs=1e-5)
    assert float(sparseness(uniform)) == pytest.approx(0.0, abs=1e-6)
    assert float(complexity(one_hot)) == pytest.approx(0.0, abs=1e-6)
    assert float(complexity(uniform)) == pytest.approx(math.log(n), rel=1e-6)
    assert float(effective_complexity(one_hot)) == 1.0
    assert float(effective_complexity(uniform)) == n
    maps = _maps().float()[1:]
    for fn in (sparseness, complexity, effective_complexity):
        torch.testing.assert_close(fn(-3.0 * maps), fn(maps), rtol=1e-5, atol=0)


def test_an_all_zero_map_is_left_out_of_complexity_and_scores_zero_elsewhere():
    maps = _maps().float()
    torch.testing.assert_close(complexity(maps), complexity(maps[1:]))
    assert float(effective_complexity(maps[:1])) == 0.0
    assert float(sparseness(maps[:1])) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(float(complexity(maps[:1])))
    assert math.isnan(float(Complexity().compute()))  # nothing scored yet


@pytest.mark.parametrize("ties", [False, True])
def test_localization_auc_equals_scikit_learn_image_by_image(ties):
    from sklearn.metrics import roc_auc_score

    maps, masks = _maps(ties=ties), _masks()
    expected = _mean(
        [
            roc_auc_score(s.flatten().numpy(), a.flatten().numpy())
            if 0 < s.sum() < s.numel()
            else math.nan
            for a, s in zip(maps, masks, strict=True)
        ]
    )
    assert float(localization_auc(maps, masks)) == pytest.approx(expected, abs=1e-6)
    metric = LocalizationAUC()
    metric.update(maps[:3], masks[:3])
    metric.update(maps[3:], masks[3:])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)


def test_localization_auc_is_one_for_the_mask_itself_and_zero_for_its_inverse():
    masks = _masks()[3:]
    assert float(localization_auc(masks, masks)) == 1.0
    assert float(localization_auc(1 - masks, masks)) == 0.0
    assert float(localization_auc(torch.ones_like(masks), masks)) == 0.5  # all tied


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 7, 30, 0.1])
def test_top_k_intersection_equals_quantus_formula_image_by_image(k, ties):
    maps, masks = _maps(ties=ties), _masks()
    pixels = math.ceil(k * 144) if isinstance(k, float) else k
    expected = _mean(
        [ref_top_k(a.numpy(), s.numpy(), pixels) for a, s in zip(maps, masks, strict=True)]
    )
    assert float(top_k_intersection(maps, masks, k=k)) == pytest.approx(expected, abs=1e-6)
    metric = TopKIntersection(k=k)
    for part in (slice(0, 2), slice(2, 6)):
        metric.update(maps[part], masks[part])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)


def test_the_registered_top_k_is_quantus_1000_pixels_at_224_px():
    metric = metric_spec("top_k_intersection").build()
    maps = torch.rand(1, 224, 224)
    masks = torch.zeros(1, 224, 224)
    masks.view(1, -1)[0, maps.flatten().argsort(descending=True)[:999]] = 1.0
    # 999 of the 1000 top pixels inside
    assert float(metric(maps, masks)) == pytest.approx(999 / 1000)
    assert metric.k == TOP_K


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: TopKIntersection(k=0), "Expected k an int >= 1 or a float in \\(0, 1\\]"),
        (lambda: TopKIntersection(k=1.5), "but got 1.5"),
        (lambda: TopKIntersection(k="10"), "but got '10'"),
        (
            lambda: top_k_intersection(torch.rand(1, 4, 4), torch.ones(1, 4, 4), k=17),
            "Expected k at most the 16 pixels of a map, but got 17",
        ),
        (lambda: EffectiveComplexity(eps=0.0), "Expected eps a finite number > 0, but got 0.0"),
        (lambda: sparseness([[0.0, 1.0]]), "Expected maps to be a torch.Tensor, but got list"),
        (lambda: complexity(torch.rand(3)), "Expected maps \\(B, h, w\\)"),
        (
            lambda: sparseness(torch.tensor([[[float("nan"), 1.0]]])),
            "Expected finite maps, but got NaN or Inf",
        ),
        (lambda: sparseness(torch.ones(1, 2, 2, dtype=torch.long)), "floating-point maps"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def _rank(rank: int, out: str, maps: torch.Tensor, masks: torch.Tensor) -> None:
    metrics = _all_metrics()
    part = slice(0, 2) if rank == 0 else slice(2, None)  # uneven shares
    for metric, inputs in metrics.values():
        args = (maps[part],) if inputs == "maps" else (maps[part], masks[part])
        metric.update(*args)
    torch.save({name: m.compute() for name, (m, _) in metrics.items()}, f"{out}/rank{rank}.pt")


def _all_metrics():
    return {
        "sparseness": (Sparseness(), "maps"),
        "complexity": (Complexity(), "maps"),
        "effective_complexity": (EffectiveComplexity(), "maps"),
        "top_k": (TopKIntersection(k=9), "masks"),
        "auc": (LocalizationAUC(), "masks"),
    }


@pytest.mark.slow
def test_exact_under_ddp_with_two_processes(tmp_path):
    maps, masks = _maps(n=7).float(), _masks(n=7)
    run_two_ranks(_rank, str(tmp_path), maps, masks)
    whole = {}
    for name, (metric, inputs) in _all_metrics().items():
        metric.update(*((maps,) if inputs == "maps" else (maps, masks)))
        whole[name] = metric.compute()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in whole.items():
            # summed float64 states: the two ranks' partial sums added, one rounding apart
            assert float(got[name]) == pytest.approx(float(value), rel=1e-6), name
