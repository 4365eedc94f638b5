"""differentiable / second_order: gradients reach the parameters, or nothing is left behind."""

from __future__ import annotations

import pytest
import torch

from relreg.explain import explain, explainer_info, list_explainers, to_pixels
from tests.conftest import images_for, make_tiny_vit

GRAD_WEIGHTED = ["chefer", "gradcam"]
OPTIONS = {"smoothgrad": {"n_samples": 2}, "integrated_gradients": {"steps": 3}}


@pytest.mark.parametrize("name", ["chefer", "rollout", "raw_attention"])
def test_loss_on_maps_reaches_patch_embedding_and_first_qkv(name):
    model = make_tiny_vit()
    x = images_for(model)
    maps = to_pixels(explain(model, x, name, differentiable=True), size=x.shape[-2:])
    assert maps.requires_grad
    mask = torch.zeros_like(maps)
    mask[:, 4:12, 4:12] = 1
    (maps * (1 - mask)).pow(2).mean().backward()
    for p in (model.patch_embed.proj.weight, model.blocks[0].attn.qkv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_explainers())
def test_non_differentiable_leaves_no_graph_and_no_grads(name):
    model = make_tiny_vit()
    maps = explain(model, images_for(model), name, **OPTIONS.get(name, {}))
    assert maps.grad_fn is None and not maps.requires_grad
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in list_explainers() if explainer_info(n).differentiable])
def test_differentiable_maps_equal_detached_maps(name):
    model = make_tiny_vit()
    x = images_for(model)
    a = explain(model, x, name, differentiable=True, **OPTIONS.get(name, {}))
    b = explain(model, x, name, **OPTIONS.get(name, {}))
    assert a.requires_grad
    torch.testing.assert_close(a.detach(), b)


@pytest.mark.parametrize(
    "name", [n for n in list_explainers() if not explainer_info(n).differentiable]
)
def test_non_differentiable_explainers_are_refused_by_the_registry_and_the_module(name):
    from relreg.lightning import RelRegModule

    model = make_tiny_vit()
    for flags in ({"differentiable": True}, {"second_order": True}):
        with pytest.raises(ValueError, match=f"Explainer '{name}' is not differentiable.*chefer"):
            explain(model, images_for(model), name, **flags)
    match = f"differentiable explainer for explainer.method, but '{name}'"
    with pytest.raises(ValueError, match=match):
        RelRegModule(model, explainer={"method": name})


def test_compiled_models_are_explained_through_their_original_module():
    model = make_tiny_vit()
    x = images_for(model)
    compiled = torch.compile(model)
    torch.testing.assert_close(explain(compiled, x, "chefer"), explain(model, x, "chefer"))


def test_first_order_treats_gradients_as_constants():
    # With the attention gradient held constant, d(map)/d(theta) lacks the second-order term:
    # the two modes must give different parameter gradients from the same map values.
    grads = []
    for second_order in (False, True):
        model = make_tiny_vit(dtype=torch.float64)
        explain(
            model,
            images_for(model),
            "chefer",
            target=1,
            differentiable=True,
            second_order=second_order,
        ).sum().backward()
        grads.append(model.blocks[-1].attn.qkv.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def _chefer_of_images(model, target, second_order, gradient="attention"):
    def fn(x):
        return explain(
            model,
            x,
            "chefer",
            target=target,
            differentiable=True,
            second_order=second_order,
            gradient=gradient,
        )

    return fn


@pytest.mark.parametrize("gradient", ["attention", "logits"])
def test_second_order_passes_gradcheck(gradient):
    model = make_tiny_vit(
        dtype=torch.float64, img_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=3
    )
    x = images_for(model, batch=1).requires_grad_(True)
    fn = _chefer_of_images(model, 1, True, gradient)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


def test_first_order_fails_gradcheck():
    # The same check must fail when the gradients are constants: proves the flag matters.
    model = make_tiny_vit(
        dtype=torch.float64, img_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=3
    )
    x = images_for(model, batch=1).requires_grad_(True)
    assert not torch.autograd.gradcheck(
        _chefer_of_images(model, 1, False), (x,), eps=1e-6, atol=1e-5, raise_exception=False
    )


def test_gradient_methods_are_differentiable_in_the_parameters():
    model = make_tiny_vit()
    maps = explain(model, images_for(model), "saliency", differentiable=True)
    maps.sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_first_order_custom_backward_equals_autograd_of_the_formula():
    from relreg.explain.attention import _PositiveGradientWeighted

    g_ = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 5, 5, generator=g_, dtype=torch.float64).requires_grad_(True)
    g = torch.randn(2, 3, 5, 5, generator=g_, dtype=torch.float64)
    w = torch.randn(2, 5, 5, generator=g_, dtype=torch.float64)
    fast = _PositiveGradientWeighted.apply(a, g)
    (grad_fast,) = torch.autograd.grad((fast * w).sum(), a)
    ref = (g * a).clamp(min=0).mean(dim=1)
    (grad_ref,) = torch.autograd.grad((ref * w).sum(), a)
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(grad_fast, grad_ref)
    assert torch.autograd.gradcheck(lambda x: _PositiveGradientWeighted.apply(x, g), (a,))
