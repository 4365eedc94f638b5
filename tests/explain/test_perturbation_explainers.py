"""Occlusion and LIME against naive per-image loops, scikit-learn, and a model whose true
attribution is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relreg.explain import explain
from relreg.explain.lime import lime_kernel, patch_features, weighted_ridge
from relreg.explain.occlusion import occlusion_windows
from tests.conftest import images_for, make_tiny_vit
from tests.numerics import U32, assert_within, in_float64, rounding_bound, twin_bound


def _naive_occlusion(model, x, target, window, stride, fill):
    """One image and one window at a time, as the definition reads."""
    out = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.float64)
    count = torch.zeros(*x.shape[-2:], dtype=torch.float64)
    (h, w), (wh, ww), (sh, sw) = x.shape[-2:], window, stride
    with torch.no_grad():
        for i in range(x.shape[0]):
            clean = model(x[i : i + 1])[0, target[i]].double()
            for top in range(0, h - wh + 1, sh):
                for left in range(0, w - ww + 1, sw):
                    y = x[i : i + 1].clone()
                    y[..., top : top + wh, left : left + ww] = fill
                    drop = clean - model(y)[0, target[i]].double()
                    out[i, top : top + wh, left : left + ww] += drop
                    if i == 0:
                        count[top : top + wh, left : left + ww] += 1
    return (out / count.clamp_min(1)).float()


@pytest.mark.parametrize(("window", "stride"), [(None, None), ((6, 4), (3, 5)), (4, 2)])
def test_occlusion_equals_the_naive_loop(window, stride):
    model = make_tiny_vit()
    x = images_for(model, batch=3)
    target = torch.tensor([1, 3, 0])
    got = explain(model, x, "occlusion", target=target, window=window, stride=stride,
                  baseline=0.3, internal_batch_size=5)  # fmt: skip
    win = window or (4, 4)
    win = (win, win) if isinstance(win, int) else win
    step = stride or win
    step = (step, step) if isinstance(step, int) else step
    want = _naive_occlusion(model, x, target, win, step, 0.3)
    model64, x64 = in_float64(model, x)
    kw = {"target": target, "window": window, "stride": stride, "baseline": 0.3}
    # the same logit differences from float32 forward passes batched two ways
    assert_within(got, want, lambda: twin_bound(lambda: explain(model64, x64, "occlusion", **kw)))


def test_occlusion_chunking_and_foil():
    model = make_tiny_vit()
    x = images_for(model, batch=2)
    runs = [explain(model, x, "occlusion", internal_batch_size=n) for n in (1, 7, None)]
    model64, x64 = in_float64(model, x)

    def bound(**kw):
        return rounding_bound(lambda: explain(model64, x64, "occlusion", **kw))

    for other in runs[1:]:
        # chunking only reblocks the float32 forward passes: twice their rounding
        assert_within(other, runs[0], lambda: 2 * bound())
    # the contrast's map is the difference of the two classes' maps (the score is linear in them)
    contrast = explain(model, x, "occlusion", target=1, foil=2)
    diff = explain(model, x, "occlusion", target=1) - explain(model, x, "occlusion", target=2)
    # each of the three maps within its rounding, then the subtraction's
    assert_within(contrast, diff, lambda: bound(target=1, foil=2) + bound(target=1)
                  + bound(target=2) + U32 * diff.abs())  # fmt: skip
    masks = occlusion_windows((16, 16), (4, 4), (4, 4))
    assert masks.shape == (16, 16, 16) and torch.equal(masks.sum(0), torch.ones(16, 16))


class PatchLinear(nn.Module):
    """logits = W @ (per-patch mean of the channel sum): linear in which patches are kept."""

    def __init__(self, weight: torch.Tensor, patch: int = 4) -> None:
        super().__init__()
        self.weight, self.patch = weight, patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool2d(x.sum(1, keepdim=True), self.patch).flatten(1)
        return pooled @ self.weight.T


def test_lime_recovers_the_weights_of_a_linear_model_on_patch_features():
    torch.manual_seed(0)
    weight = torch.randn(3, 16)  # 3 classes, 16 patches of a 16 x 16 image
    model = PatchLinear(weight)
    x = torch.rand(2, 3, 16, 16)
    target = torch.tensor([0, 2])
    features = patch_features((16, 16), (4, 4))
    maps = explain(model, x, "lime", target=target, features=features, n_samples=300,
                   alpha=1e-6, internal_batch_size=128)  # fmt: skip
    patch_means = nn.functional.avg_pool2d(x.sum(1, keepdim=True), 4).flatten(1)  # (B, 16)
    true = weight[target] * patch_means  # each kept patch adds w_f * mean_f to the logit
    coef = maps[:, ::4, ::4].flatten(1)  # the map is constant on each patch
    torch.testing.assert_close(coef, true, atol=1e-3, rtol=1e-3)
    assert torch.equal(maps, maps[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2))


def test_lime_pieces_equal_scikit_learn():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import Ridge
    from sklearn.metrics import pairwise_distances

    gen = torch.Generator().manual_seed(1)
    z = torch.randint(0, 2, (200, 9), generator=gen).double()
    z[0], z[1] = 1, 0  # the all-on first sample, and an all-off one
    d = pairwise_distances(z.numpy(), z[:1].numpy(), metric="cosine").ravel()
    want = torch.from_numpy((torch.exp(-(torch.from_numpy(d) ** 2) / 0.25**2).sqrt()).numpy())
    torch.testing.assert_close(lime_kernel(z), want)
    y = torch.randn(2, 200, generator=gen, dtype=torch.float64)
    w = lime_kernel(z)
    coef = weighted_ridge(z, y, w, alpha=1.0)
    for i in range(2):
        ref = Ridge(alpha=1.0, fit_intercept=True).fit(
            z.numpy(), y[i].numpy(), sample_weight=w.numpy()
        )
        torch.testing.assert_close(coef[i], torch.from_numpy(ref.coef_))
    assert sklearn.__version__


def test_lime_superpixels_mean_fill_probability_and_progress(capsys):
    model = make_tiny_vit()
    x = images_for(model, batch=2)
    segments = torch.zeros(16, 16, dtype=torch.long)
    segments[:, 8:] = 1
    segments[8:, :8] = 2  # three irregular regions
    maps = explain(model, x, "lime", features=segments, n_samples=40, baseline="mean",
                   progress=True, internal_batch_size=8)  # fmt: skip
    assert "lime" in capsys.readouterr().err  # the progress bar
    for region in range(3):  # one value per feature
        assert maps[0][segments == region].unique().numel() == 1
    probs = explain(model, x, "lime", n_samples=40, score_of="probability")
    assert probs.abs().max() <= 1.0 + 1e-6  # coefficients of a [0, 1] score (alpha = 1 shrinks)
    chunked = explain(model, x, "lime", n_samples=40, internal_batch_size=3)
    whole = explain(model, x, "lime", n_samples=40, internal_batch_size=None)
    model64, x64 = in_float64(model, x)
    # chunking reblocks the float32 forward passes, whose rounding the float64 fit propagates
    assert_within(
        chunked, whole, lambda: twin_bound(lambda: explain(model64, x64, "lime", n_samples=40))
    )


def test_bad_options_are_named():
    model = make_tiny_vit()
    x = images_for(model, batch=2)
    with pytest.raises(ValueError, match="window"):
        explain(model, x, "occlusion", window=32)
    with pytest.raises(ValueError, match="stride"):
        explain(model, x, "occlusion", stride=0)
    with pytest.raises(ValueError, match="baseline to broadcast"):
        explain(model, x, "occlusion", baseline=torch.zeros(5))
    with pytest.raises(ValueError, match="features of shape"):
        explain(model, x, "lime", features=torch.zeros(3, 16, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        explain(model, x, "lime", features=torch.zeros(16, 16))
    with pytest.raises(ValueError, match="no foil"):
        explain(model, x, "lime", target=0, foil=1, score_of="probability")
    with pytest.raises(ValueError, match="internal_batch_size"):
        explain(model, x, "lime", internal_batch_size=0)
    with pytest.raises(ValueError, match="baseline"):
        explain(model, x, "lime", baseline="blur")


def test_lime_renumbers_features_and_ignores_its_batch():
    model = make_tiny_vit()
    x = images_for(model, batch=2)
    two = torch.zeros(16, 16, dtype=torch.long)
    two[:, 8:] = 1
    shifted = explain(model, x, "lime", features=two + 5, n_samples=40)  # ids 5 and 6, none below
    torch.testing.assert_close(shifted, explain(model, x, "lime", features=two, n_samples=40))
    four = two.clone()
    four[8:] += 2  # four regions for the second image
    per_image = torch.stack([two, four])
    batched = explain(model, x, "lime", features=per_image, n_samples=40)
    alone = explain(model, x[:1], "lime", features=two, n_samples=40)
    model64, x64 = in_float64(model, x[:1])
    # batch size only reblocks the float32 forward passes: twice their rounding, through the fit
    assert_within(
        batched[:1],
        alone,
        lambda: twin_bound(lambda: explain(model64, x64, "lime", features=two, n_samples=40)),
    )


def test_lime_fits_in_float64_for_any_model_dtype():
    model = make_tiny_vit(dtype=torch.float64)
    x = images_for(model, batch=2)
    maps = explain(model, x, "lime", n_samples=32, score_of="probability")
    assert maps.dtype == torch.float64 and torch.isfinite(maps).all()
    half = make_tiny_vit(dtype=torch.bfloat16)
    maps = explain(half, images_for(half, batch=2), "lime", n_samples=32)
    assert maps.dtype == torch.bfloat16 and torch.isfinite(maps.float()).all()
