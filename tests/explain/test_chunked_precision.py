"""The chunked engine under bfloat16 autocast (what ``precision="bf16-mixed"`` runs): the chunk
walk accumulates in float32, gradient checkpointing changes nothing beyond rounding, and the
maps stay within bfloat16's rounding of the float32 maps.

Under autocast the model's linear layers hand the engine ``q``, ``k``, ``v`` and ``dy/dO`` in
bfloat16; :class:`relreg.explain.chunked._RowTimesAttention` casts them to float32
(:func:`relreg.explain.chunked.relevance_dtype`) and sums the chunks' contributions in float32. A
walk that summed in bfloat16 would differ between chunk sizes by bfloat16 roundings of the sum
(unit roundoff ``2**-8``), ``2**16`` times float32's: the first test tells the two apart.

Bounds come from :mod:`tests.numerics`: Monte-Carlo rounding of the float64 twin, with
bfloat16's unit roundoff on the operations autocast runs in bfloat16 (``low=BF16``: the matrix
products and fused attention; also the walk's, which run in float32, so conservative there) and
float32's elsewhere.
"""

from __future__ import annotations

import pytest
import torch

import relreg.explain.chunked as chunked
from relreg.explain import explain
from relreg.explain.chunked import propagate
from tests.explain.families import build_family
from tests.numerics import assert_within, in_float64, rounding_bound, twin_bound

BF16 = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)
TARGET = torch.tensor([0, 3])
TOLERANCE = 0.05  # bf16 against float32, relative to the largest magnitude (the docs' number)


def _walk_inputs():
    """One block's records as bf16 autocast leaves them, and a relevance row vector."""
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 2, 65, 16
    q, k, v, d_out = (torch.randn(b, h, n, d, generator=g).bfloat16() for _ in range(4))
    r = torch.rand(b, n, generator=g)
    weight = torch.randn(b, n, generator=g)
    return r, q, k, v, d_out, weight


def _step(r, q, k, v, d_out, weight, chunk_size):
    """``r @ Abar`` by chunks, and the gradients of a loss on it for ``r``, ``q`` and ``k``."""
    r, q, k = (t.detach().requires_grad_() for t in (r, q, k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = propagate(r, q, k, v, d_out, 0.25, "chefer", chunk_size)
    grads = torch.autograd.grad((out * weight).sum(), (r, q, k))
    return (out.detach(), *grads)


def test_the_chunk_walk_accumulates_in_float32_under_bf16_autocast(monkeypatch):
    r, q, k, v, d_out, weight = _walk_inputs()
    one_row = _step(r, q, k, v, d_out, weight, chunk_size=1)  # 65 partial sums per element
    halves = _step(r, q, k, v, d_out, weight, chunk_size=33)  # 2
    assert one_row[0].dtype == torch.float32  # the map, as the docstring promises
    # the same float32 sums blocked two ways: each within float32's rounding of the walk on
    # exactly these bf16 values, summed as that path sums them
    exact = [t.double() for t in (r, q, k, v, d_out, weight)]
    bounds = [
        a + b
        for a, b in zip(
            rounding_bound(lambda: _step(*exact, chunk_size=1)),
            rounding_bound(lambda: _step(*exact, chunk_size=33)),
            strict=True,
        )
    ]
    assert_within(one_row[0], halves[0], bounds[0], "map")
    assert_within(one_row[1], halves[1], bounds[1], "dr")
    # q's and k's gradients come back in their bf16: one rounding each side (2**-8 relative)
    for name, a, b, bound in zip(("dq", "dk"), one_row[2:], halves[2:], bounds[2:], strict=True):
        assert a.dtype == torch.bfloat16
        assert_within(a, b, bound + 2 * BF16 * b.double().abs(), name)

    # the same comparison fails for a walk that sums its chunks in bfloat16
    monkeypatch.setattr(chunked, "relevance_dtype", lambda t: t.dtype)
    low = [_step(r, q, k, v, d_out, weight, c)[0] for c in (1, 33)]
    assert ((low[0].double() - low[1].double()).abs() > bounds[0]).any()


def _model(family: str) -> torch.nn.Module:
    """The tiny model of ``family``, with a random head: timm zero-initialises some heads,
    which leaves uniform maps that no precision could move."""
    model = build_family(family)
    torch.nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(5))
    return model


def _maps_and_grads(model, x, autocast: bool):
    """Chefer maps ``(B, gh, gw)`` on the chunked engine and a loss's parameter gradients."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        maps = explain(model, x, "chefer", target=TARGET, differentiable=True, engine="chunked")
        half = maps.shape[-2] // 2
        (maps[:, :half].sum() - maps[:, half:].sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return maps.detach(), grads.double()


FAMILIES = ["vit", "EVA-02", "dinov2 + registers"]


@pytest.mark.parametrize("family", FAMILIES)
def test_under_bf16_autocast_checkpointing_keeps_the_maps_and_gradients(family):
    model = _model(family)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    maps, grads = _maps_and_grads(model, x, autocast=True)
    model.set_grad_checkpointing(True)
    maps_ckpt, grads_ckpt = _maps_and_grads(model, x, autocast=True)
    twin, x64 = in_float64(model, x)
    twin.set_grad_checkpointing(False)
    # the recomputation runs the same bf16 products on the same values: the maps differ at most
    # by float32 rounding of the walk; the gradients by bf16 rounding, since autograd sums the
    # bf16 gradients of q and k (from the walk and from the model) in another order
    assert_within(maps_ckpt, maps, lambda: twin_bound(lambda: _maps_and_grads(twin, x64, False))[0])
    bound_grads = twin_bound(lambda: _maps_and_grads(twin, x64, False), low=BF16)[1]
    assert_within(grads_ckpt, grads, bound_grads, "gradients")
    assert grads.abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_maps_stay_within_the_documented_tolerance_of_float32(family):
    """docs/guide/scale-out.md: under bf16-mixed, maps and gradients within 5% of their largest
    float32 magnitude (about 13 of bfloat16's roundings of 2**-8 through the blocks' products).
    A Monte-Carlo bound is no use here: one that puts bfloat16's roundoff on every product the
    walk recomputes in float32 exceeds the maps themselves on these random tiny models."""
    model = _model(family)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    maps16, grads16 = _maps_and_grads(model, x, autocast=True)
    maps32, grads32 = _maps_and_grads(model, x, autocast=False)
    assert not torch.equal(grads16, grads32)  # autocast did run the products in bf16
    assert (maps16 - maps32).abs().max() <= TOLERANCE * maps32.abs().max()
    assert (grads16 - grads32).abs().max() <= TOLERANCE * grads32.abs().max()
