"""Gradient explainers against autograd done by hand, and their axioms."""

from __future__ import annotations

import pytest
import torch

from relreg.explain import explain
from tests.conftest import images_for, make_tiny_vit
from tests.numerics import assert_within, in_float64, twin_bound


def _manual_gradient(model, x, target):
    x = x.clone().requires_grad_(True)
    model(x)[torch.arange(len(x)), target].sum().backward()
    model.zero_grad(set_to_none=True)
    return x.grad


def test_saliency_and_input_x_gradient_equal_manual_autograd():
    model = make_tiny_vit()
    x = images_for(model)
    target = torch.tensor([1, 2, 3])
    g = _manual_gradient(model, x, target)
    torch.testing.assert_close(explain(model, x, "saliency", target=target), g.abs().amax(1))
    torch.testing.assert_close(explain(model, x, "input_x_gradient", target=target), (x * g).sum(1))


def test_integrated_gradients_completeness():
    model = make_tiny_vit(dtype=torch.float64)
    x = images_for(model)
    target = torch.tensor([0, 1, 2])
    maps = explain(model, x, "integrated_gradients", target=target, steps=128)
    with torch.no_grad():
        gap = (
            model(x)[torch.arange(3), target] - model(torch.zeros_like(x))[torch.arange(3), target]
        )
    torch.testing.assert_close(maps.flatten(1).sum(1), gap, rtol=2e-2, atol=1e-3)


def test_integrated_gradients_chunking_does_not_change_result():
    model = make_tiny_vit()
    x = images_for(model)
    a = explain(model, x, "integrated_gradients", steps=4)
    b = explain(model, x, "integrated_gradients", steps=4, internal_batch_size=5)
    model64, x64 = in_float64(model, x)
    # chunking the path's images only reblocks the float32 sums: twice their rounding
    assert_within(
        a, b, lambda: twin_bound(lambda: explain(model64, x64, "integrated_gradients", steps=4))
    )


def test_smoothgrad_seed_controls_noise():
    model = make_tiny_vit()
    x = images_for(model)
    a = explain(model, x, "smoothgrad", n_samples=4, seed=1)
    assert torch.equal(a, explain(model, x, "smoothgrad", n_samples=4, seed=1))
    assert not torch.allclose(a, explain(model, x, "smoothgrad", n_samples=4, seed=2))


def test_smoothgrad_without_noise_is_saliency():
    model = make_tiny_vit()
    x = images_for(model)
    torch.testing.assert_close(
        explain(model, x, "smoothgrad", n_samples=2, noise_level=0.0), explain(model, x, "saliency")
    )


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"n_samples": 0}, "n_samples an int >= 1"),
        ({"noise_level": -1.0}, "noise_level"),
        ({"internal_batch_size": 0}, "internal_batch_size"),
    ],
)
def test_smoothgrad_option_errors(opts, match):
    model = make_tiny_vit()
    with pytest.raises(ValueError, match=match):
        explain(model, images_for(model), "smoothgrad", **opts)


def test_integrated_gradients_bad_baseline():
    model = make_tiny_vit()
    with pytest.raises(ValueError, match="baseline to broadcast"):
        explain(
            model, images_for(model), "integrated_gradients", baseline=torch.zeros(2, 3, 16, 16)
        )
