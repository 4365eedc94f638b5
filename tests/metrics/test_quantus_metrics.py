"""Complexity (sparseness, complexity, effective complexity), localisation (top-k intersection,
localization AUC), faithfulness correlation and random-logit metrics against naive per-image
references written from Quantus' code, against scikit-learn's ROC AUC, and exact under DDP.

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
    FaithfulnessCorrelation,
    LocalizationAUC,
    RandomLogit,
    Sparseness,
    TopKIntersection,
    complexity,
    effective_complexity,
    faithfulness_correlation,
    localization_auc,
    metric_spec,
    random_logit,
    sample_seeds,
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
        (lambda: FaithfulnessCorrelation(_linear_model(), runs=0), "Expected runs an int >= 1"),
        (
            lambda: FaithfulnessCorrelation(_linear_model(), subset=1.5),
            "Expected subset an int >= 1 or a float in \\(0, 1\\), but got 1.5",
        ),
        (lambda: FaithfulnessCorrelation(_linear_model(), seed="0"), "Expected seed an int"),
        (lambda: RandomLogit(_linear_model(), method="nope"), "'nope'"),
        (lambda: RandomLogit(_linear_model(), target_mode="top"), "Expected target_mode one of"),
        (lambda: RandomLogit("model"), "Expected model a torch.nn.Module, but got str"),
        (
            lambda: faithfulness_correlation(
                _linear_model(), _images(), torch.rand(7, 12, 12), subset=144, fill=0.0
            ),
            "Expected subset fewer than the 144 units of an image, but got 144",
        ),
        (
            lambda: faithfulness_correlation(
                _linear_model(), _images(), torch.rand(7, 12, 12), fill=0.0, indices=torch.arange(3)
            ),
            "Expected indices \\(7,\\) dataset indices",
        ),
    ],
)
def test_bad_arguments_are_refused_before_any_work(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def _linear_model(seed: int = 0, size: int = 12, classes: int = 3) -> torch.nn.Module:
    """A linear classifier on the pixels: the logit's drop when pixels are set to 0 is the sum of
    their contributions ``w * x``, so a map of those contributions correlates perfectly."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, classes)).eval()


def _contributions(model, images, target):
    w = model[1].weight[target].view(-1, *images.shape[1:])  # (B, 3, H, W)
    return (w * images).sum(1).detach()  # (B, H, W)


def _images(n=7, size=12, seed=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def ref_faithfulness_correlation(model, image, a_map, target, runs, k, seed_i, fill=0.0):
    """One image, one run at a time: the subsets drawn as relreg draws them (the k highest of
    ``runs`` rows of uniform keys from the sample's generator), the logit's drop, Pearson."""
    g = torch.Generator().manual_seed(seed_i)
    keys = torch.rand(runs, a_map.numel(), generator=g)
    sums, drops = [], []
    with torch.no_grad():
        clean = float(model(image[None])[0, target])
        for r in range(runs):
            idx = keys[r].topk(k).indices
            x = image.clone().view(3, -1)
            x[:, idx] = fill
            drops.append(clean - float(model(x.view(1, *image.shape))[0, target]))
            sums.append(float(a_map.flatten()[idx].double().sum()))
    a, b = np.array(sums), np.array(drops)
    if a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def test_faithfulness_correlation_equals_a_per_image_per_run_loop():
    model, images = _linear_model(), _images()
    maps = torch.rand(7, 4, 4, generator=torch.Generator().manual_seed(4))  # patch-grid maps
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    pixels = torch.nn.functional.interpolate(maps[:, None], size=(12, 12), mode="bilinear")[:, 0]
    seeds = sample_seeds(images, 5)
    expected = _mean(
        [
            ref_faithfulness_correlation(model, images[i], pixels[i], int(target[i]), 9, 14, s)
            for i, s in enumerate(seeds)
        ]
    )
    kw = dict(runs=9, subset=14, fill=0.0, target_mode="label", seed=5)
    got = faithfulness_correlation(model, images, maps, target, **kw)
    assert float(got) == pytest.approx(expected, abs=1e-5)
    metric = FaithfulnessCorrelation(model, **kw, chunk_size=4)  # other batches, other passes
    metric.update(images[:2], maps[:2], target[:2])
    metric.update(images[2:], maps[2:], target[2:])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-5)


def test_faithfulness_correlation_is_one_for_the_exact_contributions_and_minus_one_reversed():
    model, images = _linear_model(), _images()
    target = torch.arange(7) % 3
    exact = _contributions(model, images, target)
    kw = dict(target=target, runs=12, subset=0.1, fill=0.0, target_mode="label")
    assert float(faithfulness_correlation(model, images, exact, **kw)) == pytest.approx(1, abs=1e-5)
    assert float(faithfulness_correlation(model, images, -exact, **kw)) == pytest.approx(
        -1, abs=1e-5
    )


def test_each_sample_draws_its_own_subsets_whatever_its_batch_or_key():
    model, images = _linear_model(), _images()
    maps = torch.rand(7, 12, 12, generator=torch.Generator().manual_seed(6))
    kw = dict(runs=6, subset=0.2, fill=0.0)
    whole = faithfulness_correlation(model, images, maps, **kw)
    order = torch.tensor([6, 2, 0, 5, 1, 4, 3])
    torch.testing.assert_close(
        faithfulness_correlation(model, images[order], maps[order], **kw), whole
    )
    by_index = faithfulness_correlation(model, images, maps, indices=torch.arange(7), **kw)
    permuted = faithfulness_correlation(model, images[order], maps[order], indices=order, **kw)
    torch.testing.assert_close(permuted, by_index)
    other_seed = faithfulness_correlation(model, images, maps, seed=1, **kw)
    assert not torch.equal(other_seed, whole)  # the seed does reach the draws


def ref_random_logit(model, image, a_map, seed_i, method="saliency"):
    """One image: its off class drawn from its generator (uniform among the other classes), its
    map for that class, both divided by their largest absolute value, SSIM with the pair's range
    as the data range (torchmetrics, scikit-image's uniform 7 x 7 window)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    from relreg.explain import explain

    with torch.no_grad():
        logits = model(image[None])
    y, k = int(logits.argmax()), logits.shape[1]
    r = int(torch.randint(0, k - 1, (1,), generator=torch.Generator().manual_seed(seed_i)))
    off = r if r < y else r + 1
    assert off != y
    other = explain(model, image[None], method, target=torch.tensor([off]))[0].double()
    a, b = a_map.double() / a_map.abs().max(), other / other.abs().max()
    data_range = float(
        torch.cat([a.flatten(), b.flatten()]).aminmax()[1]
        - torch.cat([a.flatten(), b.flatten()]).aminmax()[0]
    )
    kw = dict(gaussian_kernel=False, kernel_size=7, data_range=data_range)
    return float(ssim(a[None, None], b[None, None], **kw))


def test_random_logit_equals_a_per_image_loop():
    from relreg.explain import explain

    model, images = _linear_model(classes=5), _images()
    maps = explain(model, images, "saliency")
    seeds = sample_seeds(images, 2)
    expected = _mean([ref_random_logit(model, images[i], maps[i], s) for i, s in enumerate(seeds)])
    got = random_logit(model, images, maps, "saliency", seed=2)
    assert float(got) == pytest.approx(expected, abs=1e-5)
    metric = RandomLogit(model, "saliency", seed=2)
    metric.update(images[:3], maps[:3])
    metric.update(images[3:], maps[3:])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-5)
    order = torch.tensor([4, 0, 6, 2, 1, 5, 3])  # per-sample draws: any batch order
    permuted = random_logit(model, images[order], maps[order], "saliency", seed=2)
    assert float(permuted) == pytest.approx(float(got), abs=1e-6)


def test_random_logit_is_one_for_a_map_that_ignores_the_class_and_lower_otherwise():
    from relreg.explain import explain
    from tests.conftest import make_tiny_vit

    vit = make_tiny_vit()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for method in ("rollout", "raw_attention"):
        assert float(random_logit(vit, x, explain(vit, x, method), method)) == pytest.approx(1.0)
    model, images = _linear_model(classes=5), _images()
    # saliency of a linear model is |w_class|: another class, another map
    assert float(random_logit(model, images, explain(model, images, "saliency"), "saliency")) < 0.5


def test_the_off_class_is_never_the_explained_one_and_covers_the_others():
    from relreg.metrics.functional.randomisation import off_classes
    from relreg.metrics.functional.sampling import sample_generators

    images = torch.randn(400, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    classes = torch.arange(400) % 4
    off = off_classes(classes, 4, sample_generators(images, 0))
    assert not (off == classes).any()
    for c in range(4):
        assert set(off[classes == c].tolist()) == set(range(4)) - {c}


def _rank(rank: int, out: str, maps: torch.Tensor, masks: torch.Tensor) -> None:
    metrics = _all_metrics()
    part = slice(0, 2) if rank == 0 else slice(2, None)  # uneven shares
    for metric, inputs in metrics.values():
        metric.update(*_inputs(inputs, maps[part], masks[part], _images().double()[part]))
    torch.save({name: m.compute() for name, (m, _) in metrics.items()}, f"{out}/rank{rank}.pt")


def _inputs(inputs, maps, masks, images):
    return {"maps": (maps,), "masks": (maps, masks), "model": (images, maps)}[inputs]


def _all_metrics():
    return {
        "sparseness": (Sparseness(), "maps"),
        "complexity": (Complexity(), "maps"),
        "effective_complexity": (EffectiveComplexity(), "maps"),
        "top_k": (TopKIntersection(k=9), "masks"),
        "auc": (LocalizationAUC(), "masks"),
        # in float64: a batch of 2 and one of 5 round the model's float32 logits differently,
        # which this test of the summed states is not about
        "faithfulness_correlation": (
            FaithfulnessCorrelation(_linear_model().double(), runs=5, subset=0.1, fill=0.0),
            "model",
        ),
        "random_logit": (RandomLogit(_linear_model().double(), "saliency"), "model"),
    }


@pytest.mark.slow
def test_exact_under_ddp_with_two_processes(tmp_path):
    maps, masks = _maps(n=7).float(), _masks(n=7)
    run_two_ranks(_rank, str(tmp_path), maps, masks)
    whole = {}
    for name, (metric, inputs) in _all_metrics().items():
        metric.update(*_inputs(inputs, maps, masks, _images().double()))
        whole[name] = metric.compute()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in whole.items():
            # summed float64 states: the two ranks' partial sums added, one rounding apart
            assert float(got[name]) == pytest.approx(float(value), rel=1e-6), name
