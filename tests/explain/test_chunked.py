"""The chunked relevance engine against the dense engine (fused attention off, A and dy/dA stored).

Maps and the parameter gradients of a loss on them must agree; no (B, heads, N, N) tensor may
appear; the fused kernel must run; the model is left as it was; attention the kernel capture
cannot read falls back to the dense engine (or raises when the chunked engine is asked for by
name).
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from relreg.explain import explain, find_attention_modules, select_engine, to_pixels
from relreg.explain.capture import KernelCapture
from relreg.explain.chunked import propagate
from relreg.lightning import RelRegModule
from tests.conftest import ManualAttention, images_for, make_tiny_vit, model_state
from tests.numerics import U64, assert_within, in_float64, rounding_bound

LAYOUTS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "nonsquare": ("vit_tiny_patch16_224", {"img_size": (12, 20)}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 2, "depth": 3}),
    "avgpool": ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}),
    "qknorm": ("vit_tiny_patch16_224", {"qk_norm": True}),
}
VARIANTS = {
    "chefer": ("chefer", {}),
    "start_layer": ("chefer", {"start_layer": 1}),
    "logits": ("chefer", {"gradient": "logits"}),
    "foil": ("chefer", {"foil": 4}),
    "rollout": ("rollout", {}),
    "raw_attention": ("raw_attention", {}),
}


def _maps_and_grads(model, x, method, engine, chunk_size=None, **options):
    """Maps, and the gradient of a mask loss on them with respect to every parameter."""
    model.zero_grad(set_to_none=True)
    target = torch.tensor([0, 3, 1])
    kw = {} if engine == "dense" else {"chunk_size": chunk_size}
    maps = explain(
        model, x, method, target=target, differentiable=True, engine=engine, **kw, **options
    )
    pix = to_pixels(maps, size=x.shape[-2:])
    mask = torch.zeros_like(pix)
    mask[:, : x.shape[-2] // 2] = 1
    ((pix * (1 - mask)).mean() - (pix * mask).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return maps.detach(), grads


def _flat(grads, like):
    """The gradients ``{name: tensor}`` as one vector, in the order of ``like``'s names."""
    return torch.cat([grads[k].flatten() for k in like])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_maps_and_parameter_gradients_equal_the_dense_engine(layout, variant):
    name, kw = LAYOUTS[layout]
    model = make_tiny_vit(name, dtype=torch.float64, **kw)
    x = images_for(model, batch=3)
    method, options = VARIANTS[variant]
    ref_maps, ref_grads = _maps_and_grads(model, x, method, "dense", **options)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    copies = {
        "dense": in_float64(model, fused=False)[0],
        "chunked": in_float64(model, fused=True)[0],
    }

    @functools.cache
    def rounding(engine, chunk_size=None):
        # one engine's float64 rounding of the maps and of all gradients at once (those that
        # vanish by symmetry, as softmax ignores a key bias, at the scale of the largest)
        def f64():
            m, g = _maps_and_grads(copies[engine], x, method, engine, chunk_size, **options)
            return m, _flat(g, ref_grads)

        return rounding_bound(f64, u=U64)

    for chunk_size in (1, 7, n, None):
        maps, grads = _maps_and_grads(model, x, method, "chunked", chunk_size, **options)
        assert grads.keys() == ref_grads.keys()
        assert max(g.abs().max() for g in ref_grads.values()) > 0

        # the same float64 sums in the two engines' orders: within both engines' rounding
        def bound(i, c=chunk_size):
            return rounding("dense")[i] + rounding("chunked", c)[i]

        at = f"chunk_size={chunk_size}"
        assert_within(maps, ref_maps, functools.partial(bound, 0), f"maps, {at}")
        got, want = _flat(grads, ref_grads), _flat(ref_grads, ref_grads)
        assert_within(got, want, functools.partial(bound, 1), f"gradients, {at}")


def test_masked_subsets_in_a_training_step_match_the_dense_engine():
    from tests.lightning.test_module import TINY, _batch

    grads, modules = {}, {}
    for engine in ("dense", "auto"):
        torch.manual_seed(0)
        module = RelRegModule(
            "vit_tiny_patch16_224",
            num_classes=4,
            model_kwargs=TINY,
            explainer={"engine": engine},
        ).double()
        batch = _batch(n=6, masked_fraction=0.5, seed=3)
        batch["image"], batch["mask"] = batch["image"].double(), batch["mask"].double()
        assert 0 < int(batch["has_mask"].sum()) < 6
        out = module.model_step(batch, training=True)
        out.loss.backward()
        grads[engine] = {n: p.grad.clone() for n, p in module.named_parameters()}
        modules[engine] = module

    def rounding(module):  # one engine's float64 rounding of all gradients
        def f64():
            module.zero_grad(set_to_none=True)
            module.model_step(batch, training=True).loss.backward()
            return torch.cat([p.grad.flatten() for p in module.parameters()])

        return rounding_bound(f64, u=U64)

    copies = (
        in_float64(modules["dense"], fused=False)[0],
        in_float64(modules["auto"], fused=True)[0],
    )
    # the same float64 sums in the two engines' orders: within both engines' rounding, all
    # gradients at the scale of the largest
    flat, ref = (torch.cat([g.flatten() for g in grads[e].values()]) for e in ("auto", "dense"))
    assert_within(flat, ref, lambda: rounding(copies[0]) + rounding(copies[1]), "gradients")


class _Recorder(TorchDispatchMode):
    """Records every op's name and the shapes of the tensors it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _record_pass(engine: str) -> tuple[_Recorder, int, int, int]:
    # small width, so that only attention-sized tensors could reach B * heads * N * N elements
    model = make_tiny_vit(depth=3, num_heads=3, embed_dim=12, mlp_ratio=1.0)
    x = images_for(model, batch=4)
    n = model.patch_embed.num_patches + 1
    with _Recorder() as rec:
        kw = {"chunk_size": 5} if engine == "chunked" else {}
        maps = explain(model, x, "chefer", differentiable=True, engine=engine, **kw)
        maps.square().sum().backward()
    return rec, 4, 3, n


def test_no_tensor_of_batch_heads_tokens_tokens_is_ever_allocated():
    rec, b, h, n = _record_pass("chunked")
    square = [s for s in rec.shapes if len(s) >= 2 and s[-2:] == (n, n)]
    assert not square and all(torch.Size(s).numel() < b * h * n * n for s in rec.shapes)
    assert max(torch.Size(s).numel() for s in rec.shapes if len(s) == 4 and s[-1] == n) <= (
        b * h * 5 * n
    )  # the chunk: (B, heads, chunk, N)
    # the same recorder sees them in the dense engine: the check can fail
    rec, b, h, n = _record_pass("dense")
    assert (b, h, n, n) in rec.shapes


def test_the_fused_kernel_runs_and_the_model_is_left_as_it_was():
    model = make_tiny_vit()
    before = model_state(model)
    assert all(m.fused_attn for m in find_attention_modules(model))
    with _Recorder() as rec:
        explain(model, images_for(model), "chefer", engine="chunked", differentiable=True).sum()
    fused = [op for op in rec.ops if "scaled_dot_product" in op and "backward" not in op]
    assert len(fused) == len(find_attention_modules(model)), rec.ops  # one forward call each
    assert model_state(model) == before
    with _Recorder() as rec:
        explain(model, images_for(model), "chefer", engine="dense")
    assert not [op for op in rec.ops if "scaled_dot_product" in op]


def test_hooks_and_flags_are_restored_after_an_error():
    model = make_tiny_vit()
    before = model_state(model)

    def fail(module, args, output):
        raise KeyError("inside the forward pass")

    handle = model.head.register_forward_hook(fail)
    with pytest.raises(KeyError, match="inside"):
        explain(model, images_for(model), "chefer", engine="chunked")
    handle.remove()
    assert model_state(model) == before


def test_attention_without_a_kernel_call_falls_back_to_the_dense_engine_with_a_debug_line(caplog):
    model = make_tiny_vit(dtype=torch.float64)
    model.blocks[1].attn.__class__ = ManualAttention
    x = images_for(model)
    with caplog.at_level(logging.DEBUG, logger="relreg.explain.engine"):
        maps = explain(model, x, "chefer", engine="auto")
    lines = [r.getMessage() for r in caplog.records if r.name == "relreg.explain.engine"]
    assert len(lines) == 1 and "block 1: made no call" in lines[0], lines
    torch.testing.assert_close(maps, explain(model, x, "chefer", engine="dense"))
    with pytest.raises(ValueError, match=r"engine='chunked'.*block 1: made no call"):
        explain(model, x, "chefer", engine="chunked")
    with pytest.warns(UserWarning, match="chunk_size=4 is not used"):
        explain(model, x, "chefer", chunk_size=4)  # memory asked for and not delivered: said


@pytest.mark.parametrize("method", ["chefer", "rollout", "raw_attention"])
def test_second_order_uses_the_dense_engine_and_is_twice_differentiable(method):
    model = make_tiny_vit(dtype=torch.float64)
    x = images_for(model, batch=2).requires_grad_(True)
    with pytest.raises(ValueError, match="second_order=True"):
        explain(model, x, method, second_order=True, differentiable=True, engine="chunked")
    maps = explain(model, x, method, second_order=True, differentiable=True)
    (grad,) = torch.autograd.grad(maps.square().sum(), x, create_graph=True)
    (again,) = torch.autograd.grad(grad.square().sum(), x)  # the fused kernel would refuse this
    assert torch.isfinite(again).all() and again.abs().sum() > 0


def test_active_attention_dropout_falls_back_and_every_kernel_call_is_judged():
    model = make_tiny_vit(attn_drop_rate=0.1).train()
    with pytest.raises(ValueError, match=r"attention dropout is active \(p=0.1\)"):
        explain(model, images_for(model), "chefer", engine="chunked")
    model = make_tiny_vit()
    block = model.blocks[0]
    tokens = torch.randn(2, 17, 24)
    auto = select_engine(model, "chefer", "auto")
    chunked = select_engine(model, "chefer", "chunked")
    assert auto.kind == chunked.kind == "chunked"

    def run(*calls):
        with KernelCapture(model) as cap:
            for call in calls:
                call()
        return cap

    def attend(**kw):
        return lambda: block.attn(block.norm1(tokens), **kw)

    rest = [lambda b=b: b(tokens) for b in model.blocks[1:]]
    bias = torch.randn(17, 17)
    cap = run(lambda: block(tokens, attn_mask=bias), *rest)
    assert [c.block for c in cap.calls] == list(range(len(model.blocks)))
    assert cap.calls[0].mask is bias and cap.calls[1].mask is None
    assert auto.after_forward(cap) is auto and chunked.after_forward(cap) is chunked
    cap = run(attend(), attend())
    assert [c.block for c in cap.calls] == [None, None]
    assert "outside the model's blocks" in auto.after_forward(cap).reason
    cap = run(*[lambda b=b: b(tokens) for b in model.blocks], lambda: model.blocks[0](tokens))
    late = auto.after_forward(cap)
    assert late.kind == "dense" and "block 0: called the attention kernel 2 times" in late.reason
    with pytest.raises(ValueError, match=r"engine='chunked'.*block 0: called the attention"):
        chunked.after_forward(cap)
    cap = run(lambda: block(tokens, is_causal=True), *rest)
    assert cap.calls[0].is_causal and "block 0: the attention kernel got is_causal=True" in (
        auto.after_forward(cap).reason
    )
    assert model_state(make_tiny_vit())["hooks"] == model_state(model)["hooks"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"engine": "flash"},
            r"Expected engine one of \('auto', 'chunked', 'dense'\), but got 'flash'",
        ),
        ({"chunk_size": 0}, r"Expected chunk_size an int >= 1 or None, but got 0"),
        ({"engine": "chunked", "second_order": True}, r"second_order=True.*engine='chunked'"),
    ],
)
def test_bad_engine_options_are_refused(options, match):
    model = make_tiny_vit()
    with pytest.raises(ValueError, match=match):
        explain(model, images_for(model), "chefer", **options)


@pytest.mark.parametrize("rule", ["attention", "chefer", "chefer_logits"])
def test_propagate_equals_the_dense_formula_and_its_autograd(rule):
    g_ = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 3, 9, 4
    q, k, v, d_out = (torch.randn(b, h, n, d, generator=g_, dtype=torch.float64) for _ in range(4))
    r = torch.rand(b, n, generator=g_, dtype=torch.float64)
    q, k, r = (t.requires_grad_(True) for t in (q, k, r))
    a = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
    if rule == "attention":
        w = a
    else:
        g = d_out @ v.transpose(-2, -1)
        if rule == "chefer_logits":
            g = g - (a.detach() * g).sum(-1, keepdim=True)
        w = (g * a).clamp(min=0)
    ref = torch.einsum("bi,bij->bj", r, w.mean(dim=1))
    out = propagate(r, q, k, v, d_out, 0.5, rule, chunk_size=4)
    torch.testing.assert_close(out, ref)
    weight = torch.randn(b, n, generator=g_, dtype=torch.float64)
    for got, want in zip(
        torch.autograd.grad((out * weight).sum(), (r, q, k)),
        torch.autograd.grad((ref * weight).sum(), (r, q, k)),
        strict=True,
    ):
        torch.testing.assert_close(got, want)
