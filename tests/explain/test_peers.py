"""relreg's gradient and perturbation explainers against captum 0.9 on the same tiny ViT and
images: saliency, integrated gradients (midpoint rule), occlusion (patch windows) and SmoothGrad
with relreg's noise fed to captum's Saliency give the same maps. The tolerance is float32
rounding of the gradients (a few ulp of the largest value); the maps are products of the same
kernels, summed in a different order."""

from __future__ import annotations

import pytest
import torch

captum = pytest.importorskip("captum.attr")

from relreg.explain import explain  # noqa: E402
from tests.conftest import images_for, make_tiny_vit  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_vit()
    x = images_for(model, batch=3)
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = theirs.abs().max()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=float(1e-5 * scale))


def test_saliency_equals_captum(setup):
    model, x, target = setup
    theirs = captum.Saliency(model).attribute(x, target=target, abs=True).amax(1)
    close(explain(model, x, "saliency", target=target), theirs)


def test_integrated_gradients_equal_captums_midpoint_rule(setup):
    model, x, target = setup
    theirs = captum.IntegratedGradients(model).attribute(
        x, baselines=0.0, target=target, n_steps=8, method="riemann_middle"
    )
    ours = explain(model, x, "integrated_gradients", target=target, steps=8, baseline=0.0)
    close(ours, theirs.sum(1))


def test_occlusion_equals_captum_with_patch_windows(setup):
    model, x, target = setup
    theirs = captum.Occlusion(model).attribute(
        x, target=target, sliding_window_shapes=(3, 4, 4), strides=(3, 4, 4), baselines=0.0
    )
    ours = explain(model, x, "occlusion", target=target, window=4, baseline=0.0)
    close(ours, theirs.mean(1))


def test_smoothgrad_equals_captums_saliency_on_the_same_noisy_copies(setup):
    model, x, target = setup
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn((4, 1, *x.shape[1:]), generator=gen)
    flat = x.flatten(1)
    points = x[None] + noise * (0.15 * (flat.amax(1) - flat.amin(1))).view(1, -1, 1, 1, 1)
    sal = captum.Saliency(model)
    theirs = torch.stack([sal.attribute(p, target=target, abs=True) for p in points]).mean(0)
    ours = explain(model, x, "smoothgrad", target=target, n_samples=4, noise_level=0.15, seed=3)
    close(ours, theirs.amax(1))
