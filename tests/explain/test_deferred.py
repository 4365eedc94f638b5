"""``defer_gradients``: the chunked engine's q/k/bias gradients computed when the model's backward
pass reaches each block, instead of waiting in autograd's buffers from the start of the backward.

The gradients must be the same numbers (the deferred hook adds the same two tensors autograd's
buffer would have added, and float addition commutes), and must be computed in the model's order:
block b's only after the model's backward has left every block above it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import relreg.explain.chunked as chunked
from relreg.explain import explain, explain_with_logits, to_pixels
from relreg.explain.capture import kernel_blocks
from relreg.explain.chunked import propagate
from tests.conftest import images_for, make_tiny_vit
from tests.explain.families import build_family

FAMILIES = ["vit", "EVA-02", "dinov2 + registers", "SigLIP (map)"]


def _grads(model, x, defer: bool, with_classification: bool, method: str = "chefer") -> dict:
    """Every parameter's gradient of a mask loss on the maps (plus cross-entropy on the logits of
    the same pass when ``with_classification``)."""
    model.zero_grad(set_to_none=True)
    target = torch.arange(x.shape[0]) % 3
    maps, logits = explain_with_logits(
        model, x, method, target=target, differentiable=True, engine="chunked",
        defer_gradients=defer,
    )  # fmt: skip
    pix = to_pixels(maps, size=x.shape[-2:])
    loss = pix[..., : x.shape[-1] // 2].mean() - pix[..., x.shape[-1] // 2 :].mean()
    if with_classification:
        loss = loss + F.cross_entropy(logits, target)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("with_classification", [True, False], ids=["with_ce", "maps_only"])
@pytest.mark.parametrize("family", FAMILIES)
def test_deferred_gradients_are_the_immediate_ones(family, with_classification):
    model = build_family(family, dtype=torch.float64)
    x = images_for(model, batch=2)
    now = _grads(model, x, False, with_classification)
    late = _grads(model, x, True, with_classification)
    assert now.keys() == late.keys()
    qkv = [n for n in now if "qkv" in n or "q_proj" in n or "k_proj" in n]
    assert qkv and all(now[n].abs().sum() > 0 for n in qkv)  # the maps reach q and k
    for name in now:  # the same two summands, added in the other order: equal to the last bit
        torch.testing.assert_close(late[name], now[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method", ["rollout", "raw_attention"])
def test_every_chunked_explainer_takes_the_option(method):
    model = make_tiny_vit(dtype=torch.float64)
    x = images_for(model, batch=2)
    now = _grads(model, x, False, True, method)
    late = _grads(model, x, True, True, method)
    for name in now:
        torch.testing.assert_close(late[name], now[name], rtol=0, atol=0, msg=name)


def _events(model, x, defer: bool) -> list[tuple[str, int]]:
    """The order of two kinds of event in the loss's backward pass: ``("model", b)`` when the
    model's gradient of block b's kernel output arrives, ``("qk", b)`` when the relevance walk's
    q/k gradients of block b are computed."""
    events: list[tuple[str, int]] = []
    blocks = kernel_blocks(model)
    handles = [
        blk.attn.register_full_backward_pre_hook(lambda m, g, b=b: events.append(("model", b)))
        for b, blk in enumerate(blocks)
    ]
    original = chunked._gradients
    block_of = {}  # the storage of a block's q -> block index

    def spy(saved, grad_out, need_r, need_q, need_k, need_bias):
        if need_q or need_k:
            events.append(("qk", block_of.get(saved.q.data_ptr(), -1)))
        return original(saved, grad_out, need_r, need_q, need_k, need_bias)

    original_step = chunked.block_step

    def step(cap, b, *args, **kwargs):
        block_of[cap.q[b].data_ptr()] = b
        return original_step(cap, b, *args, **kwargs)

    chunked._gradients = spy
    import relreg.explain.attention as attention

    attention.block_step = step
    try:
        maps, logits = explain_with_logits(
            model, x, "chefer", target=0, differentiable=True, engine="chunked",
            defer_gradients=defer,
        )  # fmt: skip
        events.clear()  # the dy/dO pass inside explain() reached the blocks too
        (maps.square().sum() + logits.sum()).backward()
    finally:
        chunked._gradients = original
        attention.block_step = original_step
        for h in handles:
            h.remove()
    return events


def test_deferred_gradients_follow_the_models_backward_pass():
    model = make_tiny_vit(depth=4)
    x = images_for(model, batch=2)
    depth = len(kernel_blocks(model))
    immediate = _events(model, x, False)
    # immediate: every block's q/k gradient before the model's backward reaches any block
    first_model = immediate.index(("model", depth - 1))
    assert {b for kind, b in immediate[:first_model] if kind == "qk"} == set(range(depth))
    deferred = _events(model, x, True)
    for b in range(depth):
        at = deferred.index(("qk", b))
        reached = {blk for kind, blk in deferred[:at] if kind == "model"}
        assert reached == set(range(b, depth)), (b, deferred)  # blocks b..top, none below


def test_a_learnable_bias_gets_its_deferred_gradient():
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 2, 9, 4
    leaves = [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(4)]
    bias0 = torch.randn(1, h, n, n, generator=g, dtype=torch.float64)
    r0 = torch.rand(b, n, generator=g, dtype=torch.float64)

    def grads(defer: bool, with_kernel: bool):
        q, k, v, d_out = (t.clone().requires_grad_(i < 2) for i, t in enumerate(leaves))
        bias = bias0.clone().requires_grad_(True)
        # non-leaf q, k and bias, as inside a model
        q_, k_, bias_ = q * 1.0, k * 1.0, bias * 1.0
        out = propagate(
            r0, q_, k_, v, d_out, d**-0.5, "chefer", 4, None, bias_, defer_gradients=defer
        )
        loss = out.square().sum()
        if with_kernel:
            o = F.scaled_dot_product_attention(q_, k_, v, attn_mask=bias_, scale=d**-0.5)
            loss = loss + (o * d_out).sum()
        return torch.autograd.grad(loss, (q, k, bias))

    for with_kernel in (True, False):
        for now, late in zip(grads(False, with_kernel), grads(True, with_kernel), strict=True):
            assert now.abs().sum() > 0
            torch.testing.assert_close(late, now, rtol=0, atol=0)


def test_defer_gradients_must_be_a_bool():
    model = make_tiny_vit()
    with pytest.raises(TypeError, match="Expected defer_gradients a bool, but got 1"):
        explain(model, images_for(model), "chefer", defer_gradients=1)
