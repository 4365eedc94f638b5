"""The LRP family on the rotary (EVA-02, RoPE-ViT, DINOv3) and relative-bias (BEiT) families.

The functional forward passes reproduce the models' logits; each block conserves relevance (less
BEiT's bias share, less what the stabilised divisions keep back); the pixel map sums to the start
less what leaves at the prefix tokens, the position embedding and BEiT's biases; the rotation rule
(gradient x input) equals a dense loop over a rotation matrix written by hand from timm's sin/cos,
conserves wherever the rotated output is nonzero and is the identity at zero angle; batched calls
equal per-image calls; the families the rules do not cover are refused by name.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from relreg.explain import explain
from relreg.explain import lrp_beit as B
from relreg.explain import lrp_eva as E
from relreg.explain import lrp_models as M
from relreg.explain import lrp_rules as R
from relreg.explain import lrp_vit as V
from relreg.explain.lrp import start_relevance
from relreg.explain.lrp_mlp import mlp_relprop
from tests.conftest import images_for, make_tiny_vit
from tests.explain.families import build_family
from tests.explain.lrp_reference import grad_x_input, unpassed_relevance
from tests.numerics import (
    U64,
    assert_within,
    fused_unfused_bound,
    in_float64,
    rounding_bound,
    sum_bound,
    twin_bound,
)

METHODS = ["transformer_attribution", "partial_lrp", "lrp"]

# tiny layouts (16x16 images, 4x4 patches, 24 dims, 2 heads of 12, 2 blocks); layer scales of 0.5
# where timm's default (1e-5) would leave the residual branches nearly without relevance
LAYOUTS = {
    # GluMlp (packed SwiGLU), interleaved rotary, absolute position embedding, avg pooling
    "eva02": ("eva02_tiny_patch14_224", {}),
    # SwiGLU (split weights) with the scale_mlp sub-norm
    "eva02_swiglu": ("eva02_base_patch14_224", {}),
    # separate q/k/v projections, two registers after the CLS token, CLS read-out
    "eva02_split_qkv_registers": (
        "eva02_tiny_patch14_224",
        {"qkv_fused": False, "num_reg_tokens": 2, "global_pool": "token"},
    ),
    # AttentionRope, GELU Mlp, layer scale, CLS read-out, no absolute position embedding
    "rope_vit": ("vit_small_patch16_rope_224", {"init_values": 0.5}),
    "rope_vit_registers": ("vit_small_patch16_rope_224", {"init_values": 0.5, "num_reg_tokens": 2}),
    # RoPE-Mixed: a learned rotation per block and head
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {"init_values": 0.5}),
    # rotate-half rotary, CLS and 4 registers, dynamic image size
    "dinov3": ("vit_small_patch16_dinov3", {"init_values": 0.5}),
    # a relative position bias per block
    "beitv2": ("beitv2_base_patch16_224", {"init_values": 0.5}),
    # one shared relative position bias, absolute position embedding, CLS read-out
    "beit_shared_abs_token": (
        "beit_base_patch16_224",
        {
            "use_rel_pos_bias": False,
            "use_shared_rel_pos_bias": True,
            "use_abs_pos_emb": True,
            "global_pool": "token",
        },
    ),
}
ROTARY = [k for k in LAYOUTS if not k.startswith("beit")]


def _model(layout: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    name, kw = LAYOUTS[layout]
    return make_tiny_vit(name, dtype=dtype, **kw)  # zero-initialised parameters (biases) random


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request):
    return request.param


def _sums(r: torch.Tensor) -> torch.Tensor:
    return r.flatten(1).sum(1)


def _bias_shares(model, fwd, start):
    """Per sample ``(B,)``, the relevance BEiT's logit biases take out over all blocks (0 else)."""
    r = V.head_relprop(model, fwd, start)
    out = torch.zeros(start.shape[0], dtype=start.dtype)
    for blk, cache in zip(reversed(model.blocks), reversed(fwd.blocks), strict=True):
        r_in, r_attn = M.lrp_family(model).block_relprop(blk, cache, r)
        if isinstance(cache, B.BeitBlockCache):
            _, r_bias = B.logit_relprop(cache, r_attn)
            out = out + (0 if r_bias is None else _sums(r_bias))
        r = r_in
    return out, r


# ------------------------------------------------------------------------ the functional model


def test_functional_forward_logits_equal_model(layout):
    model = _model(layout, dtype=torch.float32)
    x = images_for(model, batch=3)
    # the functional forward pass and timm's (fused) one: the same float32 sums in two orders
    assert_within(M.functional_forward(model, x).logits, model(x), fused_unfused_bound(model, x))


def test_functional_forward_of_the_dinov3_at_another_image_size():
    model = _model("dinov3", dtype=torch.float32)  # dynamic_img_size: rotary built for the grid
    x = torch.randn(2, 3, 20, 12, generator=torch.Generator().manual_seed(0))
    assert_within(M.functional_forward(model, x).logits, model(x), fused_unfused_bound(model, x))
    assert explain(model, x, "transformer_attribution").shape == (2, 5, 3)
    assert explain(model, x, "lrp").shape == (2, 20, 12)


@pytest.mark.parametrize("layout", ROTARY)
def test_rotation_matrices_are_the_rotation_the_model_applied(layout):
    model = _model(layout)
    fwd = M.functional_forward(model, images_for(model, batch=2))
    for cache, blk in zip(fwd.blocks, model.blocks, strict=True):
        p = cache.n_unrotated
        rotation = E.rotation_matrices(cache.rope, 12, cache.rotate_half, torch.float64)
        scale = blk.attn.scale  # the cache holds the scaled queries
        for before, after, s in ((cache.q_in, cache.qs, scale), (cache.k_in, cache.k, 1.0)):
            terms = rotation * before[:, :, p:, None, :] * s  # (B, h, P, out, in)
            # a sum of (at most) two nonzero products either way: its float64 rounding
            assert_within(terms.sum(-1), after[:, :, p:], sum_bound(terms, dim=-1, u=U64))
            assert_within(after[:, :, :p], before[:, :, :p] * s, 0)  # prefix tokens: not rotated
        # a rotation: orthogonal, and not the identity
        eye = torch.eye(12, dtype=torch.float64).expand_as(rotation)
        gram = rotation @ rotation.transpose(-2, -1)
        products = rotation[..., :, None, :] * rotation[..., None, :, :]
        # cos^2 + sin^2 of sin/cos computed in float32 (timm's rotary buffers) or float64
        assert_within(gram, eye, sum_bound(products, dim=-1))
        assert (rotation - eye).abs().max() > 0.1


# --------------------------------------------------------------------------------- rules alone


def _rotation_by_hand(sin: torch.Tensor, cos: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    """The ``(out, in)`` rotation of one position from its sin/cos vectors ``(d,)``, written from
    the layouts: interleaved pairs ``(2m, 2m+1)`` or rotate-half pairs ``(m, m + d/2)``."""
    d = sin.shape[0]
    rot = torch.zeros(d, d, dtype=torch.float64)
    if rotate_half:
        pairs = [(m, m + d // 2) for m in range(d // 2)]
    else:
        pairs = [(2 * m, 2 * m + 1) for m in range(d // 2)]
    for a, b in pairs:
        s, c = float(sin[a]), float(cos[a])
        assert float(sin[b]) == s and float(cos[b]) == c  # one angle per pair
        # (y_a, y_b) = (x_a cos - x_b sin, x_b cos + x_a sin)
        rot[a, a], rot[a, b], rot[b, a], rot[b, b] = c, -s, s, c
    return rot


@pytest.mark.parametrize("layout", ["rope_vit", "dinov3"])  # interleaved, rotate-half
def test_rotation_rule_equals_a_dense_loop_over_the_hand_built_rotation(layout):
    model = _model(layout)
    fwd = M.functional_forward(model, images_for(model, batch=1))
    cache = fwd.blocks[0]
    position = 5
    sin, cos = cache.rope[position].double().chunk(2)
    by_hand = _rotation_by_hand(sin, cos, cache.rotate_half)
    built = E.rotation_matrices(cache.rope, 12, cache.rotate_half, torch.float64)[position]
    torch.testing.assert_close(built, by_hand, rtol=0, atol=0)  # the same sin/cos entries
    g = torch.Generator().manual_seed(0)
    x = cache.q_in[0, 0, cache.n_unrotated + position]  # a real query (12,)
    r = torch.randn(12, generator=g, dtype=torch.float64)
    expected = torch.zeros(12, dtype=torch.float64)
    for j in range(12):
        contrib = [x[i].item() * by_hand[j, i].item() for i in range(12)]
        z = sum(contrib)  # the rotated output y_j
        if z == 0:
            continue  # R_j is not passed on
        for i in range(12):  # with the implementation's stabiliser: z_j pushed 1e-9 from 0
            expected[i] += contrib[i] / (z + (1e-9 if z >= 0 else -1e-9)) * r[j]
    out = R.rotation_rule(x[None], by_hand, r[None])[0]
    # the same float64 sums of (two nonzero) terms, in another order
    bound = twin_bound(lambda: R.rotation_rule(x[None], by_hand, r[None])[0], u=U64)
    assert_within(out, expected, bound)
    assert expected.abs().sum() > 0


def _rotary_queries(layout):
    """A real model's queries before the rotation ``(B, h, P, d)`` (the rotated tokens), their
    rotations ``(P, d, d)`` and random relevances ``(B, h, P, d)``."""
    model = _model(layout)
    cache = M.functional_forward(model, images_for(model, batch=2)).blocks[0]
    x = cache.q_in[:, :, cache.n_unrotated :]
    rotation = E.rotation_matrices(cache.rope, 12, cache.rotate_half, torch.float64)
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return x, rotation, r


@pytest.mark.parametrize("layout", ["rope_vit", "dinov3"])  # interleaved, rotate-half
def test_rotation_rule_conserves_wherever_the_output_is_nonzero(layout):
    x, rotation, r = _rotary_queries(layout)
    x = x.clone()
    x[:, :, 3] = 0  # one position with every output z_j = 0: its relevance is not passed on
    z = (rotation @ x.unsqueeze(-1)).squeeze(-1)
    assert (z == 0).any() and (z != 0).double().mean() > 0.9
    out = R.rotation_rule(x, rotation, r)
    passed = torch.where(z != 0, r, 0)
    # what the stabiliser keeps back: |R_j| eps / (|z_j| + eps) at each output with z_j != 0
    kept = _sums(torch.where(z != 0, r.abs() * R.EPS / (z.abs() + R.EPS), 0))
    # float64 rounding of the total: its terms x_i R_ji R_j / z_j (z_j's own rounding, relative to
    # |z_j|, moves R_j / z_j by as much as the terms' sum), and the sum of the R_j
    s = torch.where(z != 0, r / z, 0)
    terms = (x[..., None, :] * rotation * s[..., :, None]).flatten(1)
    bound = sum_bound(terms, dim=1, u=U64) + sum_bound(passed.flatten(1), dim=1, u=U64)
    assert_within(_sums(out), _sums(passed), kept + bound)
    assert (kept < 1e-6 * _sums(r.abs())).all()  # the stabiliser's share is negligible here
    # alpha1-beta0 with the same matrices, for contrast: it would drop every output whose two
    # contributions are both negative (z_j^+ = 0), over a tenth of the relevance here
    pos = x.clamp(min=0)[..., None, :] * rotation.clamp(min=0)
    neg = x.clamp(max=0)[..., None, :] * rotation.clamp(max=0)
    dropped = torch.where((pos + neg).sum(-1) > 0, 0, r).abs()
    assert (_sums(dropped) > 0.1 * _sums(r.abs())).all()


@pytest.mark.parametrize("rotate_half", [False, True])
def test_rotation_rule_at_zero_angle_returns_the_relevance_unchanged(rotate_half):
    x, _, r = _rotary_queries("rope_vit")
    p, d = x.shape[-2], x.shape[-1]
    zero_angle = torch.cat([torch.zeros(p, d), torch.ones(p, d)], dim=-1)  # sin 0, cos 1
    eye = E.rotation_matrices(zero_angle.double(), d, rotate_half, torch.float64)
    identity = torch.eye(d, dtype=torch.float64).expand(p, d, d)
    torch.testing.assert_close(eye, identity, rtol=0, atol=0)
    assert (x != 0).all()
    out = R.rotation_rule(x, eye, r)
    # R_j x_j / (x_j +- eps): off by the stabiliser's share, and one division's float64 rounding
    stabiliser = r.abs() * R.EPS / (x.abs() + R.EPS)
    assert_within(out, r, stabiliser + rounding_bound(lambda: R.rotation_rule(x, eye, r), u=U64))


def test_product_rule_equals_autograd_and_halves():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    r = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    with unpassed_relevance() as kept:
        ra, rb = R.product_rule(a, b, r)
    ref_a, ref_b = (t / 2 for t in grad_x_input(torch.mul, [a, b], r))
    torch.testing.assert_close(ra, ref_a)
    torch.testing.assert_close(rb, ref_b)
    torch.testing.assert_close(ra, rb, rtol=0, atol=0)  # half of the relevance to each operand
    # the total: off by what the stabilised division keeps back, and the sums' float64 rounding
    bound = rounding_bound(lambda: _sums(sum(R.product_rule(a, b, r))), u=U64)
    assert_within(_sums(ra + rb), _sums(r), sum(kept) + bound)


def _reference_rotary_block(blk, c, r):
    """Relevance through an ``EvaBlock`` with a fused ``qkv``, one image, head by head, the
    rotation undone position by position with the matrix built by hand from the sin/cos (the
    :func:`_rotation_by_hand` layouts) by autograd's gradient x input; the residuals, the MLP and
    the products by the rules as implemented."""
    p, hd = c.n_unrotated, c.v.shape[-1]
    r_x1, r_u2 = R.add_rule(c.x1, c.u2, r)
    r_x1 = r_x1 + mlp_relprop(blk.mlp, c.mlp, r_u2)
    r_x, r_u1 = R.add_rule(c.x, c.u1, r_x1)
    r_o = R.linear_alpha_beta(c.o, blk.attn.proj.weight, r_u1)
    rotations = [
        _rotation_by_hand(*c.rope[n].double().chunk(2), c.rotate_half)
        for n in range(c.rope.shape[0])
    ]
    r_qkv = torch.zeros(*r_o.shape[:2], 3, blk.attn.num_heads, hd, dtype=r.dtype)
    for h in range(blk.attn.num_heads):
        r_a, r_qkv[:, :, 2, h] = R.matmul_rule(
            c.attn_drop[:, h], c.v[:, h], r_o[..., h * hd : (h + 1) * hd]
        )
        r_q, r_kt = R.matmul_rule(c.qs[:, h], c.k[:, h].transpose(-2, -1), r_a)
        for which, r_rot, x in ((0, r_q, c.q_in[:, h]), (1, r_kt.transpose(-2, -1), c.k_in[:, h])):
            r_qkv[:, :p, which, h] = r_rot[:, :p]  # the prefix tokens: not rotated
            for n, rot in enumerate(rotations):
                rotate = partial(torch.matmul, other=rot.T)  # y = x R^T, row by row
                r_qkv[:, p + n, which, h] = grad_x_input(rotate, [x[:, p + n]], r_rot[:, p + n])[0]
    return r_x + R.linear_alpha_beta(c.h1, blk.attn.qkv.weight, r_qkv.flatten(2))


@pytest.mark.parametrize("layout", ["eva02", "rope_vit_registers", "dinov3"])
def test_rotary_block_equals_a_reference_with_the_hand_built_rotations(layout):
    model = _model(layout)
    fwd = M.functional_forward(model, images_for(model, batch=2))
    r = V.head_relprop(model, fwd, start_relevance(fwd.logits, torch.tensor([1, 3])))
    for i in reversed(range(len(model.blocks))):
        blk, cache = model.blocks[i], fwd.blocks[i]
        r_in, _ = E.block_relprop(blk, cache, r)
        ref = _reference_rotary_block(blk, cache, r)
        # the same float64 rules, the rotation's sums taken in another order
        assert_within(
            r_in,
            ref,
            lambda b=blk, c=cache, r=r: twin_bound(lambda: E.block_relprop(b, c, r)[0], u=U64),
            f"block {i}",
        )
        r = r_in
    assert r.abs().sum() > 0


# ------------------------------------------------------------------------------- conservation


def test_each_block_conserves_relevance_less_the_bias_share(layout):
    model = _model(layout)
    x = images_for(model, batch=3)
    fwd = M.functional_forward(model, x)
    family = M.lrp_family(model)
    r = V.head_relprop(model, fwd, start_relevance(fwd.logits, torch.tensor([0, 2, 1])))
    shares = []
    for i in reversed(range(len(model.blocks))):
        blk, cache = model.blocks[i], fwd.blocks[i]

        def through(b=blk, c=cache, r=r):
            r_in, r_attn = family.block_relprop(b, c, r)
            bias = B.logit_relprop(c, r_attn)[1] if isinstance(c, B.BeitBlockCache) else None
            return _sums(r_in) + (0 if bias is None else _sums(bias)), bias

        with unpassed_relevance() as kept:
            total, bias = through()
        # off by what the stabilised divisions keep back, and by the float64 rounding of the sums
        rounding = rounding_bound(lambda t=through: t()[0], u=U64)
        assert_within(total, _sums(r), sum(kept) + rounding, f"block {i}")
        if bias is not None:
            shares.append(_sums(bias))
        r = family.block_relprop(blk, cache, r)[0]
    if layout.startswith("beit"):  # the bias takes a share: the rule can fail where it is ignored
        assert torch.stack(shares).abs().min() > 1e-6


def test_lrp_total_is_the_start_minus_what_leaves(layout):
    model = _model(layout)
    x = images_for(model, batch=2)
    target = torch.tensor([1, 2])
    with unpassed_relevance() as kept:
        maps = explain(model, x, "lrp", target=target)

    def left():
        """Prefix tokens, position embedding, BEiT's biases: what leaves the network ``(B,)``."""
        fwd = M.functional_forward(model, x)
        bias, r = _bias_shares(model, fwd, start_relevance(fwd.logits, target))
        p = model.num_prefix_tokens
        if fwd.pos is None:
            return bias + _sums(r[:, :p])
        if not fwd.pos_on_prefix:
            _, r_pos = R.add_rule(fwd.patches, fwd.pos, r[:, p:])
            return bias + _sums(r[:, :p]) + _sums(r_pos)
        before_pos = fwd.blocks[0].x - fwd.pos  # prefix and patch tokens before pos_embed
        r_tok, r_pos = R.add_rule(before_pos, fwd.pos, r)
        return bias + _sums(r_tok[:, :p]) + _sums(r_pos)

    # off by what the stabilised divisions keep back, and by the float64 rounding of both totals
    rounding = rounding_bound(
        lambda: _sums(explain(model, x, "lrp", target=target)), u=U64
    ) + rounding_bound(left, u=U64)
    assert_within(_sums(maps), 1 - left(), sum(kept) + rounding)
    assert maps.abs().sum() > 0


# --------------------------------------------------------------------------- batching, the API


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", ["eva02", "dinov3", "beitv2"])
def test_batched_equals_per_sample_loop_and_is_deterministic(layout, method):
    model = _model(layout)
    x = images_for(model, batch=3)
    target = torch.tensor([4, 0, 2])
    batched = explain(model, x, method, target=target)
    torch.testing.assert_close(explain(model, x, method, target=target), batched, rtol=0, atol=0)
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


def test_the_three_explainers_run_on_every_family(layout):
    model = _model(layout, dtype=torch.float32)
    x = images_for(model, batch=2)
    for method in METHODS:
        maps = explain(model, x, method, target=torch.tensor([1, 3]))
        expected = (2, 16, 16) if method == "lrp" else (2, 4, 4)
        assert maps.shape == expected, method
        assert torch.isfinite(maps).all() and maps.abs().sum() > 0, method
    foil = explain(model, x, "lrp", target=torch.tensor([1, 3]), foil=0)
    assert torch.isfinite(foil).all()


@pytest.mark.parametrize(
    "family", ["EVA-02", "DINOv3 (rotary)", "RoPE-ViT", "BEiT"]
)  # the family table's own models
def test_the_family_table_models_run(family):
    model = build_family(family)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert explain(model, x, "lrp").shape == (2, 32, 32)
    assert explain(model, x, "transformer_attribution").shape == (2, 4, 4)


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "family, error, message",
    [
        (
            "NaFlexViT",
            TypeError,
            r"Expected a timm VisionTransformer.*Eva.*Beit.*but got NaFlexVit: its NaFlexEmbeds",
        ),
        (
            "SigLIP (map)",
            ValueError,
            r"global_pool 'token' or 'avg'.*'map'.*attention pool \(AttentionPoolLatent, SigLIP",
        ),
        ("Swin", ValueError, "SwinTransformer is a hierarchical window model"),
    ],
)
def test_families_the_rules_do_not_cover_are_refused_by_name(family, error, message, method):
    model = build_family(family)
    with pytest.raises(error, match=message):
        explain(model, torch.randn(1, 3, 32, 32), method)


def test_unknown_layers_and_configurations_are_refused():
    model = _model("eva02")
    model.blocks[1].mlp = nn.Identity()
    expected = r"blocks\[1\].mlp to be timm's Mlp, GluMlp or SwiGLU.*but got Identity"
    with pytest.raises(TypeError, match=expected):
        explain(model, images_for(model), "lrp")
    model = _model("beitv2")
    model.blocks[0].attn = nn.Identity()
    with pytest.raises(TypeError, match=r"blocks\[0\].attn to be timm's BEiT Attention.*Identity"):
        explain(model, images_for(model), "lrp")
    post = make_tiny_vit("eva02_tiny_patch14_224", use_post_norm=True)
    with pytest.raises(TypeError, match=r"pre-norm EvaBlock.*EvaBlockPostNorm"):
        explain(post, images_for(post), "partial_lrp")
    gqa = make_tiny_vit("vit_small_patch16_rope_224", qkv_fused=False, num_kv_heads=1, num_heads=2)
    with pytest.raises(ValueError, match="one k/v head per query head.*num_kv_groups=2"):
        explain(gqa, images_for(gqa), "lrp")
    pooled = make_tiny_vit("eva02_tiny_patch14_224", global_pool="max")
    with pytest.raises(ValueError, match="global_pool 'token' or 'avg'.*'max'"):
        explain(pooled, images_for(pooled), "transformer_attribution")
    headless = make_tiny_vit("beitv2_base_patch16_224", num_classes=0)
    with pytest.raises(ValueError, match="Linear classifier head"):
        explain(headless, images_for(headless), "lrp")


@pytest.mark.parametrize("layout", ["eva02", "beitv2"])
@pytest.mark.parametrize("method", ["lrp", "partial_lrp"])
def test_the_cvpr2021_baseline_rules_are_refused_off_the_vit(layout, method):
    model = _model(layout)
    with pytest.raises(ValueError, match=r"VisionTransformer for rules='cvpr2021_baseline'.*"):
        explain(model, images_for(model), method, rules="cvpr2021_baseline")
    assert explain(model, images_for(model), method).shape[0] == 3  # the default rules run
