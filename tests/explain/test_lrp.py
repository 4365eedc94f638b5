"""LRP explainers (lrp, partial_lrp, transformer_attribution) against rules done by hand.

The reference below re-derives every rule with autograd (gradient x input, ``R_x = x * dz/dx .
R / z``) on one image at a time, head by head, with 2-D matrices and whole-tensor sums: a
different code path from the batched, analytic implementation in ``relreg.explain.lrp_rules``
and ``relreg.explain.lrp_vit``. The transformer-attribution gradients come from the real model
(hooks, ``tests.explain.reference``).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from relreg.explain import (
    create_explainer,
    explain,
    explain_with_logits,
    explainer_info,
    list_explainers,
    to_pixels,
)
from relreg.explain import lrp as L
from relreg.explain import lrp_rules as R
from relreg.explain import lrp_vit as V
from tests.conftest import images_for, make_tiny_vit, model_state
from tests.explain.lrp_reference import grad_x_input, unpassed_relevance
from tests.explain.reference import _record_one
from tests.numerics import (
    U64,
    assert_within,
    fused_unfused_bound,
    in_float64,
    rounding_bound,
    twin_bound,
)

METHODS = ["transformer_attribution", "partial_lrp", "lrp"]

LAYOUTS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "one_block": ("vit_tiny_patch16_224", {"depth": 1, "embed_dim": 16, "num_classes": 3}),
    "nonsquare": ("vit_tiny_patch16_224", {"img_size": (12, 20)}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 2, "no_embed_class": True}),
    "avg": ("vit_tiny_patch16_224", {"global_pool": "avg"}),
    "layerscale_qknorm": ("vit_tiny_patch16_224", {"init_values": 0.3, "qk_norm": True}),
}


def _model(layout: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    name, kw = LAYOUTS[layout]
    return make_tiny_vit(name, dtype=dtype, **kw)


@pytest.fixture(params=sorted(LAYOUTS))
def model(request):
    return _model(request.param)


def _sums(r: torch.Tensor) -> torch.Tensor:
    return r.flatten(1).sum(1)


# ------------------------------------------------------------------ reference (autograd, 1 image)


def _ref_linear(x, w, r):
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    rp, rn = grad_x_input(lambda a, b: a @ wp.T + b @ wn.T, [x.clamp(min=0), x.clamp(max=0)], r)
    return rp + rn


def _stabilised(a, b):
    """``a / b`` with the implementation's stabiliser: ``b`` pushed 1e-9 away from 0, 0 at 0."""
    return torch.where(b == 0, 0.0, a / (b + 1e-9 * (2 * (b >= 0) - 1)))


def _ref_add(a, b, r):
    ra, rb = grad_x_input(torch.add, [a.expand_as(r), b.expand_as(r)], r)
    sa, sb = ra.sum(), rb.sum()
    share = sa.abs() + sb.abs()
    # the shares |sa| / share * sum(R) / sa, stabilised as the implementation's are
    fa, fb = _stabilised(sa.abs(), share) * r.sum(), _stabilised(sb.abs(), share) * r.sum()
    return ra * _stabilised(fa, sa), rb * _stabilised(fb, sb)


def _ref_matmul(a, b, r):
    ra, rb = grad_x_input(torch.matmul, [a, b], r)
    return ra / 2, rb / 2


def _ref_zb(x, conv, r):
    w, stride = conv.weight, conv.stride
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    low, high = torch.full_like(x, x.min().item()), torch.full_like(x, x.max().item())

    def z(x, lo, hi):
        return (
            F.conv2d(x, w, stride=stride)
            - F.conv2d(lo, wp, stride=stride)
            - F.conv2d(hi, wn, stride=stride)
        )

    return sum(grad_x_input(z, [x, low, high], r))


@torch.no_grad()
def _reference(model, image, cls):
    """Attention relevances [(h, N, N)] per block and the pixel map (H, W) of one image."""
    x = image[None]
    embed = model.patch_embed
    conv = embed.proj(x)
    d, gh, gw = conv.shape[1:]
    patches = embed.norm(conv.flatten(2).transpose(1, 2))[0]
    distilled = hasattr(model, "head_dist")
    names = ("cls_token", "dist_token") if distilled else ("cls_token", "reg_token")
    prefix = [getattr(model, n)[0] for n in names if getattr(model, n, None) is not None]
    pre = torch.cat(prefix) if prefix else patches[:0]
    p = len(pre)
    pos = model.pos_embed[0]
    if model.no_embed_class:
        tokens = torch.cat([pre, patches + pos])
    else:
        tokens = torch.cat([pre, patches]) + pos
    caches = []
    for blk in model.blocks:
        at = blk.attn
        hd, nh = at.head_dim, at.num_heads
        a_dim = hd * nh
        c = {"x": tokens, "h1": blk.norm1(tokens)}
        qkv = at.qkv(c["h1"])
        heads = []
        for h in range(nh):
            q = at.q_norm(qkv[:, h * hd : (h + 1) * hd]) * at.scale
            k = at.k_norm(qkv[:, a_dim + h * hd : a_dim + (h + 1) * hd])
            v = qkv[:, 2 * a_dim + h * hd : 2 * a_dim + (h + 1) * hd]
            a = (q @ k.T).softmax(-1)
            heads.append({"q": q, "k": k, "v": v, "a": a, "o": a @ v})
        c["heads"] = heads
        c["o"] = at.norm(torch.cat([h["o"] for h in heads], dim=1))
        y = at.proj(c["o"])
        c["u1"] = y * blk.ls1.gamma if hasattr(blk.ls1, "gamma") else y
        c["x1"] = tokens + c["u1"]
        c["h2"] = blk.norm2(c["x1"])
        c["g"] = blk.mlp.act(blk.mlp.fc1(c["h2"]))
        y = blk.mlp.fc2(c["g"])
        c["u2"] = y * blk.ls2.gamma if hasattr(blk.ls2, "gamma") else y
        tokens = c["x1"] + c["u2"]
        caches.append(c)
    tokens = model.norm(tokens)
    start = torch.zeros(model.num_classes, dtype=x.dtype)
    start[cls] = 1
    r = torch.zeros_like(tokens)
    if distilled:
        out0, out1 = model.head(tokens[0]), model.head_dist(tokens[1])
        logits = (out0 + out1) / 2
        r0, r1 = _ref_add(out0 / 2, out1 / 2, start)
        r[0] = _ref_linear(tokens[0], model.head.weight, r0)
        r[1] = _ref_linear(tokens[1], model.head_dist.weight, r1)
    elif model.global_pool == "token":
        logits = model.head(model.fc_norm(tokens[0]))
        r[0] = _ref_linear(model.fc_norm(tokens[0]), model.head.weight, start)
    else:
        feat = model.fc_norm(tokens[p:].mean(0))
        logits = model.head(feat)
        r_feat = _ref_linear(feat, model.head.weight, start)
        (r[p:],) = grad_x_input(lambda t: t.mean(0), [tokens[p:]], r_feat)
    torch.testing.assert_close(logits, model(x)[0], atol=1e-10, rtol=1e-10)
    attention = []
    for blk, c in zip(reversed(model.blocks), reversed(caches), strict=True):
        r_x1, r_u2 = _ref_add(c["x1"], c["u2"], r)
        r_g = _ref_linear(c["g"], blk.mlp.fc2.weight, r_u2)
        r_x1 = r_x1 + _ref_linear(c["h2"], blk.mlp.fc1.weight, r_g)
        r_x, r_u1 = _ref_add(c["x"], c["u1"], r_x1)
        r_o = _ref_linear(c["o"], blk.attn.proj.weight, r_u1)
        hd, a_dim = blk.attn.head_dim, blk.attn.head_dim * blk.attn.num_heads
        r_qkv = torch.zeros(r_o.shape[0], 3 * a_dim, dtype=r_o.dtype)
        r_attn = []
        for h, head in enumerate(c["heads"]):
            cols = slice(h * hd, (h + 1) * hd)
            r_a, r_v = _ref_matmul(head["a"], head["v"], r_o[:, cols])
            r_q, r_kt = _ref_matmul(head["q"], head["k"].T, r_a)
            r_qkv[:, cols] = r_q
            r_qkv[:, a_dim + h * hd : a_dim + (h + 1) * hd] = r_kt.T
            r_qkv[:, 2 * a_dim + h * hd : 2 * a_dim + (h + 1) * hd] = r_v
            r_attn.append(r_a)
        attention.insert(0, torch.stack(r_attn))
        r = r_x + _ref_linear(c["h1"], blk.attn.qkv.weight, r_qkv)
    if model.no_embed_class:
        r_patches, _ = _ref_add(patches, pos, r[p:])
    else:
        r_all, _ = _ref_add(torch.cat([pre, patches]), pos, r)
        r_patches = r_all[p:]
    r_conv = r_patches.T.reshape(1, d, gh, gw)
    return attention, _ref_zb(x, embed.proj, r_conv)[0].sum(0)


def _readout_row(model, n):
    p = model.num_prefix_tokens
    w = torch.zeros(n, dtype=torch.float64)
    if model.global_pool == "avg":
        w[p:] = 1 / (n - p)
    else:
        w[0] = 1
    return w


def _reference_maps(model, images, targets, foils=None, start_layer=0):
    """Per image, dense N x N: {method: (B, ...)} with the contrast as target minus foil."""
    out = {m: [] for m in METHODS}
    for i, image in enumerate(images):
        att, pix = _reference(model, image, int(targets[i]))
        attns, grads = _record_one(model, image, int(targets[i]))
        if foils is not None:
            att_f, pix_f = _reference(model, image, int(foils[i]))
            att = [a - b for a, b in zip(att, att_f, strict=True)]
            pix = pix - pix_f
            _, grads_f = _record_one(model, image, int(foils[i]))
            grads = [a - b for a, b in zip(grads, grads_f, strict=True)]
        n, p = att[0].shape[-1], model.num_prefix_tokens
        w = _readout_row(model, n)
        out["partial_lrp"].append((w @ att[-1].clamp(min=0).mean(0))[p:])
        joint = torch.eye(n, dtype=torch.float64)
        for b in range(start_layer, len(att)):
            abar = (grads[b][0] * att[b]).clamp(min=0).mean(0)
            joint = (torch.eye(n, dtype=torch.float64) + abar) @ joint
        out["transformer_attribution"].append((w @ joint)[p:])
        out["lrp"].append(pix.flatten())
    return {m: torch.stack(v) for m, v in out.items()}


# --------------------------------------------------------------------------------- rules alone


def test_linear_alpha_beta_hand_computed():
    # out0 = 2*1 + (-1)*(-2): contributions 2 and 2 (both positive) -> R0 split 1/2, 1/2
    # out1 = 3*1 + 1*(-2): contributions 3 (positive) and -2 (dropped) -> R1 all to x0
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    w = torch.tensor([[2.0, -1.0], [3.0, 1.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    expected = torch.tensor([[0.5 + 2.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(R.linear_alpha_beta(x, w, r), expected)


def test_linear_alpha_beta_equals_naive_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    r = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    expected = torch.zeros_like(x)
    for b in range(3):
        for t in range(4):
            for j in range(6):
                contrib = [max(x[b, t, i].item() * w[j, i].item(), 0.0) for i in range(5)]
                if sum(contrib) == 0:
                    continue  # no positive contribution: R_j is not passed on
                for i in range(5):
                    expected[b, t, i] += contrib[i] / sum(contrib) * r[b, t, j]
    # (the implementation's 1e-9 stabiliser of the denominators: 1e-5 relative at most here)
    torch.testing.assert_close(R.linear_alpha_beta(x, w, r), expected, atol=1e-9, rtol=1e-5)


def test_linear_alpha_beta_conserves_with_positive_inputs_only_when_some_contribution_is_positive():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 7, 5, generator=g, dtype=torch.float64) + 0.1  # all inputs > 0
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w[:, 0] = w[:, 0].abs() + 0.1  # each output has a positive contribution
    r = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_sums(R.linear_alpha_beta(x, w, r)), _sums(r), atol=1e-12, rtol=1e-7)
    # an output whose contributions are all negative passes nothing on: relevance is lost
    w[1] = -w[1].abs() - 0.1
    lost = r[..., 1].flatten(1).sum(1)
    torch.testing.assert_close(
        _sums(R.linear_alpha_beta(x, w, r)), _sums(r) - lost, atol=1e-12, rtol=1e-7
    )
    assert not torch.allclose(_sums(R.linear_alpha_beta(x, w, r)), _sums(r))


def test_matmul_rule_equals_autograd_and_conserves():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)
    r = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    ra, rb = R.matmul_rule(a, b, r)
    ref_a, ref_b = (t / 2 for t in grad_x_input(torch.matmul, [a, b], r))
    torch.testing.assert_close(ra, ref_a, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(rb, ref_b, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(_sums(ra), _sums(r) / 2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_sums(ra) + _sums(rb), _sums(r), atol=1e-6, rtol=1e-6)


def test_add_rule_conserves_per_sample_and_shares_by_absolute_sums():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(1, 4, 5, generator=g, dtype=torch.float64)  # broadcast, like pos_embed
    r = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    ra, rb = R.add_rule(a, b, r)
    torch.testing.assert_close(_sums(ra) + _sums(rb), _sums(r), atol=1e-7, rtol=1e-7)
    s = r / (a + b)
    sa, sb = _sums(a * s), _sums(b * s)
    torch.testing.assert_close(
        _sums(ra), _sums(r) * sa.abs() / (sa.abs() + sb.abs()), rtol=1e-7, atol=1e-7
    )
    # each part keeps the shape of its gradient x input relevance (a per-sample rescaling)
    torch.testing.assert_close(ra / (a * s), (_sums(ra) / sa)[:, None, None].expand_as(ra))
    # per sample: one image alone gives its own rows of the batched result
    for i in range(3):
        ra_i, rb_i = R.add_rule(a[i : i + 1], b, r[i : i + 1])
        torch.testing.assert_close(ra_i, ra[i : i + 1])
        torch.testing.assert_close(rb_i, rb[i : i + 1])


def test_conv_zb_equals_autograd_and_conserves():
    g = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(3, 5, kernel_size=4, stride=4).double()
    x = torch.randn(2, 3, 8, 12, generator=g, dtype=torch.float64)
    r = torch.rand(2, 5, 2, 3, generator=g, dtype=torch.float64)
    out = R.conv_zb(x, conv, r)
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(out[i : i + 1], _ref_zb(x[i : i + 1], conv, r[i : i + 1]))
    torch.testing.assert_close(_sums(out), _sums(r), atol=1e-7, rtol=1e-7)


def test_safe_divide_is_zero_where_the_denominator_is_zero():
    a = torch.tensor([1.0, 1.0, -2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([0.0, 2.0, -4.0, 1e-12], dtype=torch.float64)
    out = R.safe_divide(a, b)
    assert out[0] == 0 and out[1] == pytest.approx(0.5) and out[2] == pytest.approx(0.5)
    assert torch.isfinite(out).all() and out[3] > 0


# ------------------------------------------------------------------------ the functional model


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_functional_forward_logits_equal_model(layout):
    model = _model(layout, dtype=torch.float32)
    x = images_for(model, batch=3)
    # the functional forward pass and timm's (fused) one: the same float32 sums in two orders
    assert_within(V.functional_forward(model, x).logits, model(x), fused_unfused_bound(model, x))


def test_functional_forward_dynamic_img_size():
    model = make_tiny_vit(dynamic_img_size=True)
    x = torch.randn(2, 3, 20, 12)
    # the functional forward pass and timm's (fused) one: the same float32 sums in two orders
    assert_within(V.functional_forward(model, x).logits, model(x), fused_unfused_bound(model, x))
    maps = explain(model, x, "transformer_attribution")
    assert maps.shape == (2, 5, 3)
    assert explain(model, x, "lrp").shape == (2, 20, 12)


def test_each_block_and_the_head_conserve_relevance(model):
    x = images_for(model, batch=3)
    fwd = V.functional_forward(model, x)
    start = L.start_relevance(fwd.logits, torch.tensor([0, 2, 1]))
    with unpassed_relevance() as kept:
        r = V.head_relprop(model, fwd, start)
    # off by what the stabilised divisions keep back, and by the float64 rounding of the sums
    rounding = rounding_bound(lambda: _sums(V.head_relprop(model, fwd, start)), u=U64)
    assert_within(_sums(r), _sums(start), sum(kept) + rounding, "head")
    for i in reversed(range(len(model.blocks))):
        blk, cache = model.blocks[i], fwd.blocks[i]
        with unpassed_relevance() as kept:
            r_in, r_attn = V.block_relprop(blk, cache, r)
        # as for the head: the divisions' stabiliser, the sums' float64 rounding
        rounding = rounding_bound(
            lambda b=blk, c=cache, r=r: _sums(V.block_relprop(b, c, r)[0]), u=U64
        )
        assert_within(_sums(r_in), _sums(r), sum(kept) + rounding, f"block {i}")
        # the attention branch's relevance reaches A halved by the A @ v rule (less what the
        # stabiliser keeps back)
        assert (_sums(r_attn).abs() <= _sums(r).abs() + sum(kept)).all()
        _, again = V.block_relprop(blk, cache, r, attention_only=True)
        torch.testing.assert_close(again, r_attn)
        r = r_in
    assert V.embed_relprop(model, fwd, r).shape == x.shape  # its total: the next test


def test_lrp_total_is_the_start_minus_what_prefix_tokens_and_pos_embed_take(model):
    x = images_for(model, batch=2)
    target = torch.tensor([1, 2])
    with unpassed_relevance() as kept:
        maps = explain(model, x, "lrp", target=target)

    def absorbed():
        fwd = V.functional_forward(model, x)
        r = V.head_relprop(model, fwd, L.start_relevance(fwd.logits, target))
        for blk, cache in zip(reversed(model.blocks), reversed(fwd.blocks), strict=True):
            r, _ = V.block_relprop(blk, cache, r)
        p = model.num_prefix_tokens
        if model.no_embed_class:
            _, r_pos = R.add_rule(fwd.patches, fwd.pos, r[:, p:])
            return _sums(r[:, :p]) + _sums(r_pos)
        before_pos = fwd.blocks[0].x - fwd.pos  # prefix and patch tokens before pos_embed
        r_tok, r_pos = R.add_rule(before_pos, fwd.pos, r)
        return _sums(r_tok[:, :p]) + _sums(r_pos)

    # off by what the stabilised divisions keep back, and by the float64 rounding of both totals
    rounding = rounding_bound(
        lambda: _sums(explain(model, x, "lrp", target=target)), u=U64
    ) + rounding_bound(absorbed, u=U64)
    assert_within(_sums(maps), 1 - absorbed(), sum(kept) + rounding)


def test_lrp_conserves_everything_without_prefix_tokens_or_pos_embed():
    # nothing learned is added to the patch tokens: the pixel map sums to the start relevance 1
    model = make_tiny_vit(
        dtype=torch.float64, class_token=False, global_pool="avg", pos_embed="none"
    )
    x = images_for(model)
    with unpassed_relevance() as kept:
        maps = explain(model, x, "lrp", target=3)
    # off by what the stabilised divisions keep back, and by the float64 rounding of the total
    rounding = rounding_bound(lambda: _sums(explain(model, x, "lrp", target=3)), u=U64)
    assert_within(_sums(maps), torch.ones(3, dtype=torch.float64), sum(kept) + rounding)


# -------------------------------------------------------------------------- against reference


def _reference_bound(model, x, method, **kw):
    """Bound on the implementation (``explain(model, x, method, **kw)``, float64, attention as the
    model runs it) against a reference of the same float64 sums (stabilisers matched) in another
    order, unfused: the rounding of the unfused path and of the fused one."""
    paths = in_float64(model, fused=False)[0], in_float64(model, fused=True)[0]
    return sum(
        rounding_bound(lambda m=m: explain(m, x, method, **kw).flatten(1), u=U64) for m in paths
    )


def test_equals_per_image_autograd_reference(model):
    x = images_for(model, batch=2)
    target = torch.tensor([1, 2])
    refs = _reference_maps(model, x, target)
    for method in METHODS:
        maps = explain(model, x, method, target=target)
        assert refs[method].abs().max() > 0
        bound = partial(_reference_bound, model, x, method, target=target)
        assert_within(maps.flatten(1), refs[method], bound, method)


def test_transformer_attribution_start_layer_equals_reference():
    model = make_tiny_vit(dtype=torch.float64, depth=3, reg_tokens=1)
    x = images_for(model, batch=2)
    target = torch.tensor([4, 0])
    maps = explain(model, x, "transformer_attribution", target=target, start_layer=1)
    ref = _reference_maps(model, x, target, start_layer=1)["transformer_attribution"]
    kw = {"target": target, "start_layer": 1}
    bound = partial(_reference_bound, model, x, "transformer_attribution", **kw)
    assert_within(maps.flatten(1), ref, bound)
    assert not torch.allclose(maps, explain(model, x, "transformer_attribution", target=target))


@pytest.mark.parametrize("layout", ["vit", "distilled"])
def test_foil_is_the_target_relevance_minus_the_foils(layout):
    model = _model(layout)
    x = images_for(model, batch=2)
    target, foil = torch.tensor([1, 2]), torch.tensor([3, 0])
    ref = _reference_maps(model, x, target, foils=foil)
    for method in METHODS:
        maps = explain(model, x, method, target=target, foil=foil)
        bound = partial(_reference_bound, model, x, method, target=target, foil=foil)
        assert_within(maps.flatten(1), ref[method], bound, method)
        assert not torch.allclose(maps, explain(model, x, method, target=target))


def test_literal_contrast_start_vanishes_under_the_normalised_add_rule():
    # why the foil is handled as a difference: one_hot(t) - one_hot(f) sums to 0, and the
    # normalised residual rule rescales every part to a share of that total
    model = make_tiny_vit(dtype=torch.float64)
    x = images_for(model, batch=2)
    fwd = V.functional_forward(model, x)
    start = L.start_relevance(fwd.logits, torch.tensor([1, 2]))
    contrast = start - L.start_relevance(fwd.logits, torch.tensor([3, 0]))
    att, _ = V.propagate(model, fwd, contrast, 0)
    att_t, _ = V.propagate(model, fwd, start, 0)
    assert att[0].abs().max() < 1e-6 * att_t[0].abs().max()


# --------------------------------------------------------------------------- batching, targets


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", ["vit", "avg", "distilled"])
def test_batched_equals_per_sample_loop(layout, method):
    model = _model(layout)
    x = images_for(model, batch=3)
    target = torch.tensor([4, 0, 2]) if model.num_classes > 4 else torch.tensor([2, 0, 1])
    batched = explain(model, x, method, target=target)
    looped = torch.cat(
        [explain(model, x[i : i + 1], method, target=int(target[i])) for i in range(3)]
    )
    model64, x64 = in_float64(model, x)
    # batch size only reblocks the float64 sums: twice their rounding, propagated to the maps
    assert_within(
        batched,
        looped,
        lambda: twin_bound(lambda: explain(model64, x64, method, target=target), u=U64),
        method,
    )


@pytest.mark.parametrize("method", METHODS)
def test_target_as_int_tensor_or_none(method):
    model = make_tiny_vit(dtype=torch.float64)
    x = images_for(model, batch=3)
    top1 = model(x).argmax(1)
    torch.testing.assert_close(explain(model, x, method), explain(model, x, method, target=top1))
    torch.testing.assert_close(
        explain(model, x, method, target=2),
        explain(model, x, method, target=torch.tensor([2, 2, 2])),
    )
    torch.testing.assert_close(
        explain(model, x, method, target=[2, 2, 2]), explain(model, x, method, target=2)
    )
    assert not torch.allclose(
        explain(model, x, method, target=2), explain(model, x, method, target=0)
    )


# ------------------------------------------------------------------------- state, errors, API


@pytest.mark.parametrize("method", METHODS)
def test_model_left_as_found_also_after_errors(method):
    model = make_tiny_vit()
    model.train()
    model.blocks[0].requires_grad_(False)
    x = images_for(model)
    x_before = x.clone()
    before = model_state(model)
    explain(model, x, method)
    assert model_state(model) == before
    torch.testing.assert_close(x, x_before, atol=0, rtol=0)
    assert not x.requires_grad
    with pytest.raises(ValueError, match=r"target classes in \[0, 4\]"):
        explain(model, x, method, target=7)  # raised after the forward pass
    assert model_state(model) == before

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.blocks[1].mlp.fc2.register_forward_hook(boom)
    with_hook = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        explain(model, x, method)
    assert model_state(model) == with_hook
    handle.remove()
    assert model_state(model) == before


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (nn.Linear(3, 3), TypeError, "Expected a timm VisionTransformer.*but got Linear"),
        (
            torchvision.models.resnet18(num_classes=3),
            TypeError,
            "Expected a timm VisionTransformer.*but got ResNet",
        ),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_non_vit_models_are_rejected(bad, error, message, method):
    with pytest.raises(error, match=message):
        explain(bad, torch.randn(1, 3, 16, 16), method)


def test_unsupported_layers_and_pooling_are_rejected():
    model = make_tiny_vit()
    model.blocks[1] = nn.Identity()
    with pytest.raises(TypeError, match=r"blocks\[1\] to be a timm Block.*but got Identity"):
        explain(model, images_for(model), "lrp")
    pooled = make_tiny_vit(global_pool="max")
    with pytest.raises(ValueError, match="global_pool 'token' or 'avg'.*'max'"):
        explain(pooled, images_for(pooled), "partial_lrp")
    headless = make_tiny_vit(num_classes=0)
    with pytest.raises(ValueError, match="Linear classifier head"):
        explain(headless, images_for(headless), "transformer_attribution")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("flags", [{"differentiable": True}, {"second_order": True}])
def test_differentiable_is_refused(method, flags):
    model = make_tiny_vit()
    with pytest.raises(ValueError, match=f"'{method}' is not differentiable"):
        explain(model, images_for(model), method, **flags)


@pytest.mark.parametrize("start_layer", [-1, 2, 1.0, True])
def test_bad_start_layer(start_layer):
    model = make_tiny_vit()
    with pytest.raises(ValueError, match=r"start_layer an int in \[0, 1\]"):
        explain(model, images_for(model), "transformer_attribution", start_layer=start_layer)
    with pytest.raises(TypeError, match="unknown options"):
        explain(model, images_for(model), "lrp", start_layer=0)


@pytest.mark.parametrize("method", METHODS)
def test_bad_images(method):
    model = make_tiny_vit()
    fn = explainer_info(method).fn
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\), but got shape \(3, 16, 16\)"):
        fn(model, torch.randn(3, 16, 16))  # direct call, without the registry's checks
    with pytest.raises(
        ValueError, match=r"images of size \(16, 16\) for this model, but got \(20, 20\)"
    ):
        explain(model, torch.randn(2, 3, 20, 20), method)
    with pytest.raises(ValueError, match="3 channels"):
        explain(model, torch.randn(2, 1, 16, 16), method)


def test_registry_explain_create_explainer_and_to_pixels():
    assert {"transformer_attribution", "partial_lrp", "lrp"} <= set(list_explainers())
    assert explainer_info("transformer_attribution").output == "grid"
    assert explainer_info("transformer_attribution").options == ("start_layer",)
    assert explainer_info("partial_lrp").output == "grid"
    assert explainer_info("lrp").output == "pixel"
    assert "CVPR 2021" in explainer_info("transformer_attribution").paper
    model = make_tiny_vit()
    x = images_for(model)
    maps = explain(model, x, "transformer_attribution")
    assert maps.shape == (3, 4, 4) and not maps.requires_grad
    explainer = create_explainer("transformer_attribution", model, start_layer=1)
    torch.testing.assert_close(
        explainer(x, target=1),
        explain(model, x, "transformer_attribution", target=1, start_layer=1),
    )
    pixels = to_pixels(maps, size=x.shape[-2:])
    assert pixels.shape == (3, 16, 16) and pixels.min() >= 0 and pixels.max() <= 1
    out = explain_with_logits(model, x, "lrp")
    # the functional forward pass and timm's (fused) one: the same float32 sums in two orders
    assert_within(out.logits, model(x), lambda: fused_unfused_bound(model, x), "logits")
    assert out.maps.shape == (3, 16, 16)


def test_works_under_no_grad_and_refuses_inference_mode_for_gradients():
    model = make_tiny_vit()
    x = images_for(model)
    with torch.no_grad():
        inside = explain(model, x, "transformer_attribution")
    torch.testing.assert_close(inside, explain(model, x, "transformer_attribution"))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        explain(model, x, "transformer_attribution")
