"""``lrp`` / ``partial_lrp`` with ``rules="cvpr2021_baseline"`` against a dense, per-image
reference.

The reference re-derives the CVPR 2021 paper's baseline rule set (see
:mod:`relreg.explain.lrp_baseline`) one image and one token at a time: explicit contribution
matrices ``z_ij`` and relevance fractions ``z_ij / z_j`` for the linear layers and the patch
convolution, explicit per-element fractions ``a_ik b_kj / z_ij`` for the matrix products and
``a / (a + b)`` for the additions, python loops over tokens, heads and patches. It shares no code
with the batched implementation (``safe(R, z) = R / (z + 1e-9)``, 0 where ``z == 0``, is the
stabiliser of the public code both follow).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from relreg.explain import explain, explainer_info
from relreg.explain import lrp_baseline as B
from relreg.explain import lrp_rules as R
from relreg.explain import lrp_vit as V
from tests.conftest import images_for, make_tiny_vit
from tests.numerics import assert_within, rounding_bound

BASE = {"rules": "cvpr2021_baseline"}
EPS = 1e-9

LAYOUTS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 2, "no_embed_class": True}),
    "avg": ("vit_tiny_patch16_224", {"global_pool": "avg"}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "layerscale_qknorm": ("vit_tiny_patch16_224", {"init_values": 0.3, "qk_norm": True}),
}


def _model(layout: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    name, kw = LAYOUTS[layout]
    return make_tiny_vit(name, dtype=dtype, **kw)


def _sums(r: torch.Tensor) -> torch.Tensor:
    return r.flatten(1).sum(1)


# ------------------------------------------------------------------ dense reference (1 image)


def _frac(part: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``part / (total + 1e-9)``, 0 where ``total == 0`` (``total`` broadcast to ``part``)."""
    total = total.expand_as(part)
    return torch.where(total == 0, torch.zeros_like(part), part / (total + EPS))


def _dense_linear(x, w, r):
    """x (T, I), w (O, I), r (T, O) -> (T, I): z_tji = x_ti^+ w_ji^+ (then x^- w^-), fractions
    z_tji / z_tj of each output's relevance, each sign part normalised on its own."""
    out = torch.zeros_like(x)
    for xs, ws in ((x.clamp(min=0), w.clamp(min=0)), (x.clamp(max=0), w.clamp(max=0))):
        z = ws[None, :, :] * xs[:, None, :]  # (T, O, I) contribution of input i to output j
        f = _frac(z, z.sum(2, keepdim=True))
        out += (f * r[:, :, None]).sum(1)
    return out


def _dense_add(a, b, r):
    a, b = a.expand_as(r), b.expand_as(r)
    return _frac(a, a + b) * r, _frac(b, a + b) * r


def _dense_fork(x, *rs):
    return sum(_frac(x, x) * r for r in rs)


def _dense_matmul(a, b, r):
    """a (n, k), b (k, m), r (n, m): contributions c_ikj = a_ik b_kj, fractions c_ikj / z_ij."""
    c = a[:, :, None] * b[None, :, :]
    f = _frac(c, c.sum(1, keepdim=True))
    weighted = f * r[:, None, :]
    return weighted.sum(2) / 2, weighted.sum(0) / 2


def _dense_zb(x, conv, r):
    """x (C, H, W), r (D, gh, gw): per patch, z_ji = x_i w_ji - l w_ji^+ - h w_ji^-."""
    lo, hi = x.min(), x.max()
    ph, pw = conv.kernel_size
    w = conv.weight.flatten(1)  # (D, C*ph*pw)
    out = torch.zeros_like(x)
    for gy in range(r.shape[1]):
        for gx in range(r.shape[2]):
            rows, cols = slice(gy * ph, (gy + 1) * ph), slice(gx * pw, (gx + 1) * pw)
            patch = x[:, rows, cols].flatten()
            z = patch[None, :] * w - lo * w.clamp(min=0) - hi * w.clamp(max=0)
            f = _frac(z, z.sum(1, keepdim=True))
            out[:, rows, cols] = (f * r[:, gy, gx][:, None]).sum(0).view(-1, ph, pw)
    return out


def _gamma(ls):
    return ls.gamma if hasattr(ls, "gamma") else 1.0


@torch.no_grad()
def _dense_reference(model, image, start):
    """Attention relevances [(h, N, N)] per block and the pixel map (H, W) of one image."""
    embed = model.patch_embed
    conv = embed.proj(image[None])[0]
    d, gh, gw = conv.shape
    patches = conv.flatten(1).T
    distilled = hasattr(model, "head_dist")
    names = ("cls_token", "dist_token") if distilled else ("cls_token", "reg_token")
    pre = [getattr(model, n)[0] for n in names if getattr(model, n, None) is not None]
    pre = torch.cat(pre) if pre else patches[:0]
    p, pos = len(pre), model.pos_embed[0]
    tokens = (
        torch.cat([pre, patches + pos]) if model.no_embed_class else torch.cat([pre, patches]) + pos
    )
    caches = []
    for blk in model.blocks:
        at, c = blk.attn, {"x": tokens}
        hd, nh = at.head_dim, at.num_heads
        c["h1"] = blk.norm1(tokens)
        qkv = at.qkv(c["h1"]).view(-1, 3, nh, hd)
        c["heads"] = []
        for h in range(nh):
            q, k, v = at.q_norm(qkv[:, 0, h]), at.k_norm(qkv[:, 1, h]), qkv[:, 2, h]
            a = (q @ k.T * at.scale).softmax(-1)
            c["heads"].append({"q": q, "k": k, "v": v, "a": a})
        c["o"] = torch.cat([hh["a"] @ hh["v"] for hh in c["heads"]], dim=1)
        c["u1"] = at.proj(c["o"]) * _gamma(blk.ls1)
        c["x1"] = tokens + c["u1"]
        c["h2"] = blk.norm2(c["x1"])
        c["g"] = blk.mlp.act(blk.mlp.fc1(c["h2"]))
        c["u2"] = blk.mlp.fc2(c["g"]) * _gamma(blk.ls2)
        tokens = c["x1"] + c["u2"]
        caches.append(c)
    tokens = model.norm(tokens)
    r = torch.zeros_like(tokens)
    if distilled:
        out0, out1 = model.head(tokens[0]), model.head_dist(tokens[1])
        r0, r1 = _dense_add(out0 / 2, out1 / 2, start)
        r[0] = _dense_fork(tokens[0], _dense_linear(tokens[:1], model.head.weight, r0[None])[0])
        r[1] = _dense_fork(
            tokens[1], _dense_linear(tokens[1:2], model.head_dist.weight, r1[None])[0]
        )
        logits = (out0 + out1) / 2
    elif model.global_pool == "token":
        feat = model.fc_norm(tokens[:1])
        r[0] = _dense_fork(tokens[0], _dense_linear(feat, model.head.weight, start[None])[0])
        logits = model.head(feat)[0]
    else:
        mean = tokens[p:].mean(0)
        feat = model.fc_norm(mean[None])
        r_mean = _dense_linear(feat, model.head.weight, start[None])[0]
        for t in range(p, len(tokens)):  # z_t = x_t / P, fractions x_t / (P mean)
            r[t] = _frac(tokens[t] / (len(tokens) - p), mean) * r_mean
        logits = model.head(feat)[0]
    torch.testing.assert_close(logits, model(image[None])[0], atol=1e-10, rtol=1e-10)
    attention = []
    for blk, c in zip(reversed(model.blocks), reversed(caches), strict=True):
        r_skip, r_u2 = _dense_add(c["x1"], c["u2"], r)
        r_h2 = _dense_linear(
            c["h2"], blk.mlp.fc1.weight, _dense_linear(c["g"], blk.mlp.fc2.weight, r_u2)
        )
        r_x1 = _dense_fork(c["x1"], r_skip, r_h2)
        r_skip, r_u1 = _dense_add(c["x"], c["u1"], r_x1)
        r_o = _dense_linear(c["o"], blk.attn.proj.weight, r_u1)
        hd, nh = blk.attn.head_dim, blk.attn.num_heads
        r_qkv = torch.zeros(len(r_o), 3, nh, hd, dtype=r_o.dtype)
        r_attn = []
        for h, hh in enumerate(c["heads"]):
            r_a, r_qkv[:, 2, h] = _dense_matmul(hh["a"], hh["v"], r_o[:, h * hd : (h + 1) * hd])
            r_qkv[:, 0, h], r_kt = _dense_matmul(hh["q"], hh["k"].T, r_a)
            r_qkv[:, 1, h] = r_kt.T
            r_attn.append(r_a)
        attention.insert(0, torch.stack(r_attn))
        r_h1 = _dense_linear(c["h1"], blk.attn.qkv.weight, r_qkv.flatten(1))
        r = _dense_fork(c["x"], r_skip, r_h1)
    if model.no_embed_class:
        r_patches = _dense_add(patches, pos, r[p:])[0]
    else:
        r_patches = _dense_add(torch.cat([pre, patches]), pos, r)[0][p:]
    pixels = _dense_zb(image, embed.proj, r_patches.T.reshape(d, gh, gw))
    return attention, pixels.sum(0)


def _dense_maps(model, images, starts):
    """{"lrp": (B, H*W), "partial_lrp": (B, P)} from per-image start relevances (B, K)."""
    out = {"lrp": [], "partial_lrp": []}
    for image, start in zip(images, starts, strict=True):
        attention, pixels = _dense_reference(model, image, start)
        n, p = attention[-1].shape[-1], model.num_prefix_tokens
        row = torch.zeros(n, dtype=torch.float64)
        if model.global_pool == "avg":
            row[p:] = 1 / (n - p)
        else:
            row[0] = 1
        out["partial_lrp"].append((row @ attention[-1].clamp(min=0).mean(0))[p:])
        out["lrp"].append(pixels.flatten())
    return {m: torch.stack(v) for m, v in out.items()}


def _one_hot(classes, k=5):
    return torch.nn.functional.one_hot(torch.as_tensor(classes), k).double()


def _assert_maps(maps, ref, msg=""):
    scale = ref.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(maps.flatten(1), ref, atol=1e-9 * scale, rtol=1e-7, msg=msg or None)


# -------------------------------------------------------------------------- against reference


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_equals_dense_per_image_reference(layout):
    model = _model(layout)
    x = images_for(model, batch=2)
    target = torch.tensor([1, 3])
    ref = _dense_maps(model, x, _one_hot(target))
    for method in ("lrp", "partial_lrp"):
        _assert_maps(explain(model, x, method, target=target, **BASE), ref[method], method)


def test_paper_layout_in_float32_within_tolerance():
    # the unnormalised additions amplify float32 rounding where a + b is small (by the condition
    # number (|a| + |b|) / |a + b|), so the tolerance is float32 rounding propagated through these
    # tensors (tests/numerics.py), per element: no fixed share of the scale holds on every kernel
    model = _model("vit", dtype=torch.float32)
    x = images_for(model, batch=2)
    model64, x64, target = copy.deepcopy(model).double(), x.double(), torch.tensor([0, 4])
    ref = _dense_maps(model64, x64, _one_hot(target))
    for method in ("lrp", "partial_lrp"):
        maps = explain(model, x, method, target=target, **BASE).double()
        bound = rounding_bound(lambda m=method: explain(model64, x64, m, target=target, **BASE))
        assert_within(maps.flatten(1), ref[method], bound.flatten(1), method)


def test_foil_weights_and_functions_start_from_the_signed_vector():
    model = _model("vit")
    x = images_for(model, batch=2)
    target, foil = torch.tensor([1, 2]), torch.tensor([3, 0])
    contrast = _one_hot(target) - _one_hot(foil)
    ref = _dense_maps(model, x, contrast)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)
    ref_w = _dense_maps(model, x, w)
    for method in ("lrp", "partial_lrp"):
        by_foil = explain(model, x, method, target=target, foil=foil, **BASE)
        _assert_maps(by_foil, ref[method], f"{method} foil")
        # one pass from one_hot(t) - one_hot(f) = the target's map minus the foil's (linearity)
        if method == "lrp":
            diff = explain(model, x, method, target=target, **BASE) - explain(
                model, x, method, target=foil, **BASE
            )
            torch.testing.assert_close(by_foil, diff, atol=1e-9 * diff.abs().max(), rtol=1e-7)
        by_fn = explain(
            model,
            x,
            method,
            target=lambda y: (
                y.gather(1, target[: len(y), None])[:, 0] - y.gather(1, foil[: len(y), None])[:, 0]
            ),
            **BASE,
        )
        torch.testing.assert_close(by_fn, by_foil)
        _assert_maps(explain(model, x, method, target=w, **BASE), ref_w[method], f"{method} w")


@pytest.mark.parametrize("method", ["lrp", "partial_lrp"])
@pytest.mark.parametrize("layout", ["vit", "avg", "distilled"])
def test_batched_equals_per_image_loop(layout, method):
    model = _model(layout)
    x = images_for(model, batch=3)
    target = torch.tensor([4, 0, 2])
    batched = explain(model, x, method, target=target, **BASE)
    looped = torch.cat(
        [explain(model, x[i : i + 1], method, target=int(target[i]), **BASE) for i in range(3)]
    )
    torch.testing.assert_close(batched, looped, atol=1e-9 * looped.abs().max().item(), rtol=1e-7)


@pytest.mark.parametrize("method", ["lrp", "partial_lrp"])
def test_default_rules_are_the_conservative_ones(method):
    model = _model("vit")
    x = images_for(model, batch=2)
    default = explain(model, x, method, target=1)
    torch.testing.assert_close(default, explain(model, x, method, target=1, rules="conservative"))
    assert not torch.allclose(default, explain(model, x, method, target=1, **BASE))
    assert explainer_info(method).options == ("rules",)


# ------------------------------------------------------------------------------- conservation


def test_linear_rule_hands_each_output_out_once_per_sign_part():
    # out0 = 1*2 + (-2)*(-1): z+ = 2 (x0 w00), z- = 2 (x1 w01): R0 = 1 goes to x0 AND to x1
    # out1 = 1*3 + (-2)*1: z+ = 3 (x0 w10), z- = 0: R1 = 2 goes to x0 only
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    w = torch.tensor([[2.0, -1.0], [3.0, 1.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(B.linear_rule(x, w, r), torch.tensor([[3.0, 1.0]]).double())
    # the conservative rules normalise both parts together: [0.5 + 2, 0.5], sum 3 = sum R
    torch.testing.assert_close(R.linear_alpha_beta(x, w, r), torch.tensor([[2.5, 0.5]]).double())
    # in general: sum_i R_i = sum_j R_j ([z_j+ > 0] + [z_j- > 0])
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    x[0, 0] = x[0, 0].abs()  # one token without negative inputs: z- = 0 there
    r = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    zp = x.clamp(min=0) @ w.clamp(min=0).T
    zn = x.clamp(max=0) @ w.clamp(max=0).T
    assert (zn == 0).any() and (zn > 0).any()
    # (with the stabiliser: each part hands out R_j z_j / (z_j + 1e-9))
    expected = _sums(r * (zp / (zp + EPS) + zn / (zn + EPS)))
    torch.testing.assert_close(_sums(B.linear_rule(x, w, r)), expected, atol=1e-12, rtol=1e-10)
    roughly = _sums(r * ((zp > 0).double() + (zn > 0).double()))
    torch.testing.assert_close(_sums(B.linear_rule(x, w, r)), roughly, atol=1e-3, rtol=1e-3)


def test_add_fork_and_matmul_rules_conserve():
    g = torch.Generator().manual_seed(7)
    a, b, r = (torch.randn(2, 4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    ra, rb = B.add_rule(a, b, r)
    torch.testing.assert_close(ra + rb, r, atol=1e-6, rtol=1e-6)  # elementwise, no rescaling
    torch.testing.assert_close(ra, a / (a + b) * r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(B.fork_rule(a, b, r), b + r, atol=1e-6, rtol=1e-6)
    m1 = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    m2 = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)
    rm = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    r1, r2 = B.matmul_rule(m1, m2, rm)
    torch.testing.assert_close(_sums(r1), _sums(rm) / 2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_sums(r2), _sums(rm) / 2, atol=1e-6, rtol=1e-6)
    z = torch.zeros(3, dtype=torch.float64)
    assert (B.safe_div(torch.ones(3, dtype=torch.float64), z) == 0).all()


def test_the_head_doubles_a_one_hot_start():
    # the CLS token after the final norm has entries of both signs, so do the head's weights
    model = _model("vit")
    fwd = V.functional_forward(model, images_for(model, batch=3))
    start = _one_hot([0, 2, 4])
    r = B.head_relprop(model, fwd, start)
    torch.testing.assert_close(_sums(r), 2 * _sums(start), atol=1e-7, rtol=0)
    # the conservative head hands out exactly the start
    torch.testing.assert_close(_sums(V.head_relprop(model, fwd, start)), _sums(start))


def _no_prefix_no_pos(nonnegative: bool) -> nn.Module:
    model = make_tiny_vit(
        dtype=torch.float64, class_token=False, global_pool="avg", pos_embed="none"
    )
    if nonnegative:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear | nn.Conv2d):
                    m.weight.abs_()
    return model


def test_full_lrp_conserves_only_when_one_sign_part_is_active():
    # nothing learned joins the patch tokens; with non-negative weights every Linear layer has
    # z- = 0, so each relevance is handed out once: the map sums to the start relevance 1
    model = _no_prefix_no_pos(nonnegative=True)
    maps = explain(model, images_for(model), "lrp", target=3, **BASE)
    torch.testing.assert_close(_sums(maps), torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
    # signed weights: the same model does not conserve (the conservative rules do)
    model = _no_prefix_no_pos(nonnegative=False)
    x = images_for(model)
    sums = _sums(explain(model, x, "lrp", target=3, **BASE))
    assert ((sums - 1).abs() > 0.5).all(), sums
    conservative = _sums(explain(model, x, "lrp", target=3))
    torch.testing.assert_close(conservative, torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("method", ["lrp", "partial_lrp"])
@pytest.mark.parametrize("bad", ["magic", "CVPR2021_baseline", None, 1])
def test_bad_rules_value_names_the_option_and_the_choices(method, bad):
    model = make_tiny_vit()
    message = f"Expected rules one of ('conservative', 'cvpr2021_baseline'), but got {bad!r}."
    with pytest.raises(ValueError, match=re.escape(message)):
        explain(model, images_for(model), method, rules=bad)


def test_rules_is_not_an_option_of_transformer_attribution():
    model = make_tiny_vit()
    with pytest.raises(TypeError, match="unknown options.*rules"):
        explain(model, images_for(model), "transformer_attribution", **BASE)
