"""Attention explainers against naive per-image, dense N x N references (PROTOCOLS.md rules)."""

from __future__ import annotations

import pytest
import torch

from relreg.explain import explain, num_prefix_tokens
from tests.conftest import images_for, make_tiny_vit
from tests.explain.reference import dense_chefer, dense_gradcam, dense_rollout
from tests.numerics import U64, assert_within, in_float64, rounding_bound

GRADIENTS = ("attention", "logits")


def _within_rounding(maps, ref, model, x, name, **kw):
    """``maps`` (``explain(model, x, name, **kw)``, float64, timm's fused attention as the model
    has it) against a dense reference of the same float64 sums in another order: within the
    rounding of the unfused path and of the fused one."""
    paths = in_float64(model, fused=False)[0], in_float64(model, fused=True)[0]

    def bound():
        return sum(
            rounding_bound(lambda m=m: explain(m, x, name, **kw).flatten(1), u=U64) for m in paths
        )

    assert_within(maps.flatten(1), ref, bound, name)


LAYOUTS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "nonsquare": ("vit_tiny_patch16_224", {"img_size": (12, 20)}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 2, "depth": 3}),
}


@pytest.fixture(params=sorted(LAYOUTS))
def model(request):
    name, kw = LAYOUTS[request.param]
    return make_tiny_vit(name, dtype=torch.float64, **kw)


@pytest.mark.parametrize("start_layer", [0, 1])
def test_chefer_equals_dense_reference(model, start_layer):
    x = images_for(model, batch=3)
    target = torch.tensor([0, 3, 1])
    maps = explain(model, x, "chefer", target=target, start_layer=start_layer)
    ref = dense_chefer(model, x, target, num_prefix_tokens(model), start_layer)
    assert maps.shape[0] == 3 and maps.shape[1] * maps.shape[2] == ref.shape[1]
    _within_rounding(maps, ref, model, x, "chefer", target=target, start_layer=start_layer)


def test_chefer_logit_gradient_equals_dense_softmax_jacobian(model):
    x = images_for(model, batch=3)
    target = torch.tensor([2, 0, 1])
    maps = explain(model, x, "chefer", target=target, gradient="logits")
    ref = dense_chefer(model, x, target, num_prefix_tokens(model), gradient="logits")
    _within_rounding(maps, ref, model, x, "chefer", target=target, gradient="logits")
    assert not torch.allclose(maps, explain(model, x, "chefer", target=target))


def test_chefer_logit_gradient_ignores_a_function_preserving_value_bias():
    # b added to every value of a block and W_proj b removed after the projection: the same
    # function; dy/dA shifts by <dy/dout_i, b> per row, which moves the default rule only
    model = make_tiny_vit("vit_tiny_patch16_224", dtype=torch.float64)
    x = images_for(model, batch=4)
    target = model(x).argmax(1)
    before = {g: explain(model, x, "chefer", target=target, gradient=g) for g in GRADIENTS}
    logits = model(x)
    gen = torch.Generator().manual_seed(0)
    hooks = []
    for block in model.blocks:
        attn = block.attn
        dim = attn.qkv.out_features // 3
        bias = torch.randn(dim, generator=gen, dtype=torch.float64) * 3
        shift = torch.cat([torch.zeros(2 * dim, dtype=torch.float64), bias])
        hooks.append(attn.qkv.register_forward_hook(lambda m, i, o, s=shift: o + s))
        hooks.append(attn.proj.register_forward_hook(lambda m, i, o, b=bias: o - m.weight @ b))
    try:
        torch.testing.assert_close(model(x), logits)
        after = {g: explain(model, x, "chefer", target=target, gradient=g) for g in GRADIENTS}
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(after["logits"], before["logits"])
    assert (after["attention"] - before["attention"]).abs().max() > 1e-3


def test_chefer_gradient_option_is_checked():
    model = make_tiny_vit("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="gradient 'attention' or 'logits', but got 'probs'"):
        explain(model, images_for(model), "chefer", gradient="probs")


def test_chefer_default_target_is_top1(model):
    x = images_for(model, batch=3)
    top1 = model(x).argmax(1)
    torch.testing.assert_close(
        explain(model, x, "chefer"), explain(model, x, "chefer", target=top1)
    )


@pytest.mark.parametrize("start_layer", [0, 1])
def test_rollout_equals_dense_reference(model, start_layer):
    x = images_for(model, batch=2)
    maps = explain(model, x, "rollout", start_layer=start_layer)
    ref = dense_rollout(model, x, num_prefix_tokens(model), start_layer)
    _within_rounding(maps, ref, model, x, "rollout", start_layer=start_layer)


def test_rollout_conserves_mass(model):
    # Each M is row-stochastic, so the CLS row of the product sums to 1 over all tokens; the
    # patch columns hold the rest after the prefix tokens' share.
    x = images_for(model, batch=2)
    maps = explain(model, x, "rollout")
    assert torch.all(maps >= 0)
    assert torch.all(maps.flatten(1).sum(1) <= 1 + 1e-9)


def test_gradcam_equals_reference(model):
    x = images_for(model, batch=3)
    target = torch.tensor([2, 2, 4])
    maps = explain(model, x, "gradcam", target=target)
    ref = dense_gradcam(model, x, target, num_prefix_tokens(model))
    _within_rounding(maps, ref, model, x, "gradcam", target=target)


def test_raw_attention_is_last_block_cls_row(model):
    x = images_for(model, batch=2)
    from relreg.explain import AttentionCapture

    with AttentionCapture(model) as cap:
        model(x)
    ref = cap.attentions[-1].mean(1)[:, 0, num_prefix_tokens(model) :]
    torch.testing.assert_close(explain(model, x, "raw_attention").flatten(1), ref)


def test_foil_explains_the_contrast():
    # Chefer relevance is not linear in the score, but the gradient is: for the contrast the
    # gradient-weighted maps must use dy_t/dA - dy_f/dA. Check against the dense reference by
    # building a model whose head outputs y_t - y_f as its class 0.
    model = make_tiny_vit(dtype=torch.float64)
    x = images_for(model, batch=2)
    t, f = torch.tensor([1, 2]), torch.tensor([3, 0])
    maps = explain(model, x, "chefer", target=t, foil=f)
    rows = []
    for i in range(2):
        w = model.head.weight.data.clone()
        b = model.head.bias.data.clone()
        contrast = make_tiny_vit(dtype=torch.float64)
        contrast.head.weight.data[0] = w[t[i]] - w[f[i]]
        contrast.head.bias.data[0] = b[t[i]] - b[f[i]]
        rows.append(dense_chefer(contrast, x[i : i + 1], torch.tensor([0]), 1)[0])
    _within_rounding(maps, torch.stack(rows), model, x, "chefer", target=t, foil=f)
    assert not torch.allclose(maps, explain(model, x, "chefer", target=t))


def test_dynamic_img_size_follows_the_input():
    model = make_tiny_vit(dtype=torch.float64, dynamic_img_size=True)
    x = torch.randn(2, 3, 20, 12, dtype=torch.float64)
    target = torch.tensor([1, 4])
    maps = explain(model, x, "chefer", target=target)
    assert maps.shape == (2, 5, 3)
    _within_rounding(maps, dense_chefer(model, x, target, 1), model, x, "chefer", target=target)
