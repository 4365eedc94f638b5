"""Properties every registered explainer must have, run over the whole registry."""

from __future__ import annotations

import pytest
import torch

from relreg.explain import create_explainer, explain, explainer_info, list_explainers, patch_grid
from tests.conftest import images_for, make_tiny_vit, model_state
from tests.numerics import assert_within, fused_unfused_bound, in_float64, twin_bound

ALL = list_explainers()
FAST_OPTIONS = {
    "smoothgrad": {"n_samples": 3},
    "integrated_gradients": {"steps": 4},
    "lime": {"n_samples": 48},
}


def _explain(model, x, name, **kw):
    return explain(model, x, name, **{**FAST_OPTIONS.get(name, {}), **kw})


def test_registry_lists_the_contracted_methods():
    expected = {
        "raw_attention",
        "rollout",
        "chefer",
        "gradcam",
        "saliency",
        "input_x_gradient",
        "smoothgrad",
        "integrated_gradients",
    }
    assert expected <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_shapes_on_every_token_layout(any_vit, name):
    x = images_for(any_vit, batch=2)
    maps = _explain(any_vit, x, name)
    if explainer_info(name).output == "grid":
        n_patches = (x.shape[2] // 4) * (x.shape[3] // 4)
        assert maps.shape == (2, *patch_grid(any_vit, x.shape[-2:], n_patches))
        assert maps.shape == (2, x.shape[2] // 4, x.shape[3] // 4)
    else:
        assert maps.shape == (2, *x.shape[-2:])
    assert torch.isfinite(maps).all()
    assert not maps.requires_grad


@pytest.mark.parametrize("name", ALL)
def test_batched_equals_per_sample_loop(any_vit, name):
    x = images_for(any_vit, batch=3)
    target = torch.tensor([4, 0, 2])
    batched = _explain(any_vit, x, name, target=target)
    looped = torch.cat(
        [_explain(any_vit, x[i : i + 1], name, target=int(target[i])) for i in range(3)]
    )
    model64, x64 = in_float64(any_vit, x)
    # batch size only reblocks the float32 sums: twice their rounding, propagated to the maps
    assert_within(
        batched, looped, lambda: twin_bound(lambda: _explain(model64, x64, name, target=target))
    )


@pytest.mark.parametrize("name", ALL)
def test_deterministic(vit, name):
    x = images_for(vit)
    torch.testing.assert_close(_explain(vit, x, name), _explain(vit, x, name), atol=0, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_model_left_as_found(name):
    model = make_tiny_vit()
    model.train()  # explainers must not switch the mode either way
    model.blocks[0].requires_grad_(False)
    before = model_state(model)
    _explain(model, images_for(model), name)
    assert model_state(model) == before


@pytest.mark.parametrize("name", ALL)
def test_cleanup_after_error_inside_the_call(name):
    model = make_tiny_vit()
    before = model_state(model)

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.head.register_forward_hook(boom)
    before_with_hook = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        _explain(model, images_for(model), name)
    assert model_state(model) == before_with_hook
    handle.remove()
    assert model_state(model) == before


@pytest.mark.parametrize("name", ALL)
def test_create_explainer_matches_explain(vit, name):
    x = images_for(vit)
    explainer = create_explainer(name, vit, **FAST_OPTIONS.get(name, {}))
    torch.testing.assert_close(explainer(x, target=1), _explain(vit, x, name, target=1))
    assert name in repr(explainer)


@pytest.mark.parametrize("name", ALL)
def test_works_under_no_grad(vit, name):
    x = images_for(vit)
    with torch.no_grad():
        inside = _explain(vit, x, name)
    torch.testing.assert_close(inside, _explain(vit, x, name))


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("raw_attention", "rollout")])
def test_target_changes_class_specific_maps(vit, name):
    x = images_for(vit)
    assert not torch.allclose(_explain(vit, x, name, target=0), _explain(vit, x, name, target=3))


@pytest.mark.parametrize("name", ALL)
def test_explain_with_logits_returns_the_models_logits(vit, name):
    from relreg.explain import explain_with_logits

    x = images_for(vit)
    out = explain_with_logits(vit, x, name, **FAST_OPTIONS.get(name, {}))
    # the explainer's own forward pass (unfused, or functional) against timm's fused one
    assert_within(out.logits, vit(x), lambda: fused_unfused_bound(vit, x), "logits")
    torch.testing.assert_close(out.maps, _explain(vit, x, name))


@pytest.mark.parametrize("name", ["chefer", "rollout", "gradcam", "saliency", "input_x_gradient"])
def test_differentiable_logits_come_from_the_same_forward(name):
    from relreg.explain import explain_with_logits

    model = make_tiny_vit()
    out = explain_with_logits(model, images_for(model), name, differentiable=True)
    out.logits.sum().backward()  # the classification loss backpropagates without a second forward
    assert model.head.weight.grad is not None


@pytest.mark.parametrize("frozen", ["all", "patch_embed", "none"])
def test_same_maps_whatever_trains(frozen):
    # with a trainable patch embedding the graph reaches every attention map through the weights;
    # otherwise the input becomes a leaf: both routes must give the same relevance
    model = make_tiny_vit()
    x = images_for(model)
    reference = explain(model, x, "chefer", target=1)
    if frozen == "all":
        model.requires_grad_(False)
    elif frozen == "patch_embed":
        model.patch_embed.requires_grad_(False)
    torch.testing.assert_close(explain(model, x, "chefer", target=1), reference)
    maps = explain(model, x, "chefer", target=1, differentiable=True)
    assert maps.requires_grad
