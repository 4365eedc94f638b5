"""Targets beyond a class index: (B, K) weights on the logits and functions of the logits."""

from __future__ import annotations

import pytest
import torch

from relreg.explain import explain, list_explainers
from tests.conftest import images_for, make_tiny_vit
from tests.numerics import U32, assert_within, in_float64, rounding_bound

FAST = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"steps": 4},
        "lime": {"n_samples": 48}}  # fmt: skip


@pytest.mark.parametrize("name", list_explainers())
def test_one_hot_weights_and_a_selecting_function_equal_the_class_target(name):
    model = make_tiny_vit()
    x = images_for(model, batch=3)
    weights = torch.zeros(3, 5)
    weights[torch.arange(3), torch.tensor([2, 0, 4])] = 1.0
    by_class = explain(model, x, name, target=torch.tensor([2, 0, 4]), **FAST.get(name, {}))
    by_weights = explain(model, x, name, target=weights, **FAST.get(name, {}))
    torch.testing.assert_close(by_weights, by_class)
    # a function works row by row (explainers score chunks and copies of the batch)
    by_function = explain(model, x, name, target=lambda y: y[:, 4], **FAST.get(name, {}))
    by_four = explain(model, x, name, target=4, **FAST.get(name, {}))
    torch.testing.assert_close(by_function, by_four)


@pytest.mark.parametrize("name", ["input_x_gradient", "integrated_gradients", "occlusion", "lrp"])
def test_linear_explainers_are_linear_in_the_weights(name):
    """For methods linear in the score, explaining 2 y_1 - 0.5 y_3 is 2 map_1 - 0.5 map_3."""
    model = make_tiny_vit()
    x = images_for(model, batch=2)
    w = torch.zeros(5)
    w[1], w[3] = 2.0, -0.5
    mixed = explain(model, x, name, target=w, **FAST.get(name, {}))
    parts = 2.0 * explain(model, x, name, target=1, **FAST.get(name, {}))
    if name == "lrp":  # LRP is linear only within a sign: w+ and w- are propagated apart
        parts = parts - explain(model, x, name, target=3, **FAST.get(name, {})) * 0.5
    else:
        parts = parts - 0.5 * explain(model, x, name, target=3, **FAST.get(name, {}))
    model64, x64 = in_float64(model, x)

    def bound():
        # each of the three maps within its own rounding; then the subtraction's
        b = [rounding_bound(lambda t=t: explain(model64, x64, name, target=t, **FAST.get(name, {})))
             for t in (w.double(), 1, 3)]  # fmt: skip
        return b[0] + 2.0 * b[1] + 0.5 * b[2] + U32 * parts.abs()

    assert_within(mixed, parts, bound, name)


def test_a_margin_function_is_the_contrast_with_the_runner_up():
    model = make_tiny_vit()
    x = images_for(model, batch=3)
    logits = model(x)
    top2 = logits.topk(2, dim=1).indices

    def margin(y: torch.Tensor) -> torch.Tensor:
        t = y.gather(1, top2[: len(y), :1])[:, 0]
        others = y.scatter(1, top2[: len(y), :1], float("-inf"))
        return t - others.amax(1)

    for name in ("saliency", "chefer", "gradcam"):
        got = explain(model, x, name, target=margin)
        want = explain(model, x, name, target=top2[:, 0], foil=top2[:, 1])
        torch.testing.assert_close(got, want)


def test_bad_targets_are_named():
    model = make_tiny_vit()
    x = images_for(model, batch=2)
    with pytest.raises(TypeError, match="foil=None with a target function"):
        explain(model, x, "chefer", target=torch.ones(5), foil=1)
    with pytest.raises(ValueError, match=r"weights of shape \(2, 5\) or \(5,\)"):
        explain(model, x, "chefer", target=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"target function to return shape \(2,\)"):
        explain(model, x, "saliency", target=lambda y: y)
