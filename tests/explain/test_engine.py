"""The one engine choice: decided before the forward pass where it can be, reported once, and the
two engines give the same maps."""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from relreg.explain import EngineChoice, explain, select_engine
from tests.conftest import ManualAttention, images_for, make_tiny_vit
from tests.numerics import assert_within, in_float64, rounding_bound

LOGGER = "relreg.explain.engine"


class _Wrapped(torch.nn.Module):
    """A ViT inside a wrapper without a ``blocks`` list: the chunked engine cannot attribute the
    kernel's calls to blocks, known before any forward pass."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.global_pool = vit.global_pool

    @property
    def patch_embed(self) -> torch.nn.Module:
        return self.vit.patch_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


def _no_blocks(dtype: torch.dtype = torch.float64):
    return _Wrapped(make_tiny_vit(dtype=dtype))


def _manual(dtype: torch.dtype = torch.float64):
    model = make_tiny_vit(dtype=dtype)
    model.blocks[1].attn.__class__ = ManualAttention
    return model


def _masked(dtype: torch.dtype = torch.float64):
    """A model whose forward passes an additive attention bias to every block (random, so that
    it changes the maps): read at the kernel call by the chunked engine."""
    model = make_tiny_vit(dtype=dtype)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    bias = torch.randn(n, n, dtype=dtype, generator=torch.Generator().manual_seed(0))
    model.forward = lambda x: VisionTransformer.forward(model, x, attn_mask=bias)
    return model


def _count_forward_passes(model) -> list[int]:
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def _engine_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize(
    ("build", "options"),
    [
        (_no_blocks, {}),
        (make_tiny_vit, {"second_order": True, "differentiable": True}),
        (lambda: make_tiny_vit(attn_drop_rate=0.1).train(), {}),
    ],
    ids=["no_blocks", "second_order", "attention_dropout"],
)
@pytest.mark.parametrize("method", ["chefer", "rollout", "raw_attention"])
def test_a_static_fall_back_is_decided_before_the_only_forward_pass(build, options, method):
    model = build()
    calls = _count_forward_passes(model)
    choice = select_engine(model, method, "auto", options.get("second_order", False))
    assert choice.kind == "dense" and choice.reason and not calls  # no forward pass to decide
    explain(model, images_for(model), method, engine="auto", **options)
    assert len(calls) == 1


@pytest.mark.parametrize("engine", ["auto", "chunked", "dense"])
def test_a_usable_model_runs_one_forward_pass_on_either_engine(engine):
    model = make_tiny_vit()
    calls = _count_forward_passes(model)
    choice = select_engine(model, "chefer", engine)
    assert choice.kind == ("dense" if engine == "dense" else "chunked") and not calls
    explain(model, images_for(model), "chefer", engine=engine, differentiable=True)
    assert len(calls) == 1


def test_a_late_fall_back_is_the_only_one_that_costs_a_second_pass(caplog):
    # the counter can count past one: only what the forward pass shows costs a pass
    model = _manual()
    x = images_for(model)
    calls = _count_forward_passes(model)
    assert select_engine(model, "chefer", "auto").kind == "chunked"
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        maps = explain(model, x, "chefer", engine="auto")
    assert len(calls) == 2
    lines = _engine_lines(caplog)
    assert len(lines) == 1 and "block 1: made no call of F.scaled_dot_product_attention" in lines[0]
    torch.testing.assert_close(maps, explain(model, x, "chefer", engine="dense"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"engine='chunked'.*block 1: made no call"):
        explain(model, x, "chefer", engine="chunked")


@pytest.mark.parametrize("method", ["chefer", "rollout", "raw_attention"])
def test_an_attention_bias_is_read_at_the_kernel_call(method):
    model = _masked()
    x = images_for(model)
    dense = explain(model, x, method, engine="dense")
    chunked = explain(model, x, method, engine="chunked", chunk_size=5)
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-15)  # float64 throughout
    assert not torch.allclose(dense, explain(make_tiny_vit(dtype=torch.float64), x, method))


@pytest.mark.parametrize("method", ["chefer", "rollout", "raw_attention"])
def test_chunked_on_an_unreadable_model_raises_before_any_forward_pass(method):
    model = _no_blocks()
    calls = _count_forward_passes(model)
    with pytest.raises(
        ValueError,
        match=r"^Expected a model the chunked engine can read \(engine='chunked'\), but _Wrapped "
        r"has no list of blocks \(model\.blocks\) to attribute the attention kernel's calls to; "
        r"use engine='auto' or 'dense'\.$",
    ):
        explain(model, images_for(model), method, engine="chunked")
    with pytest.raises(
        ValueError,
        match=r"^Expected engine 'auto' or 'dense' with second_order=True .*, but got "
        r"engine='chunked'\.$",
    ):
        explain(make_tiny_vit(), images_for(model), method, engine="chunked", second_order=True)
    with pytest.raises(ValueError, match=r"attention dropout is active \(p=0.1\)"):
        select_engine(make_tiny_vit(attn_drop_rate=0.1).train(), method, "chunked")
    assert not calls


@pytest.mark.parametrize(
    ("build", "options", "reason"),
    [
        (_no_blocks, {}, "_Wrapped has no list of blocks"),
        (make_tiny_vit, {"second_order": True}, "second_order=True"),
        (_manual, {}, "block 1: made no call"),
    ],
    ids=["static", "second_order", "late"],
)
def test_auto_reports_its_reason_once(caplog, build, options, reason):
    model = build()
    x = images_for(model)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        explain(model, x, "chefer", engine="auto", **options)
    lines = _engine_lines(caplog)
    assert len(lines) == 1 and reason in lines[0] and lines[0].startswith("chefer: dense"), lines
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOGGER), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        explain(model, x, "chefer", engine="auto", chunk_size=4, **options)
    said = [m for m in w if issubclass(m.category, UserWarning) and "relevance engine" in str(m)]
    assert len(said) == 1 and reason in str(said[0].message), [str(m.message) for m in w]
    assert "chunk_size=4 is not used" in str(said[0].message)
    assert said[0].filename == __file__  # points at the caller, whatever the depth inside relreg
    assert not _engine_lines(caplog)  # warned instead of logged, not both


def test_nothing_is_reported_when_the_chunked_engine_runs(caplog):
    model = make_tiny_vit()
    with caplog.at_level(logging.DEBUG, logger=LOGGER), warnings.catch_warnings():
        warnings.simplefilter("error")
        explain(model, images_for(model), "chefer", engine="auto", chunk_size=4)
        explain(model, images_for(model), "chefer", engine="dense")
    assert not _engine_lines(caplog)


def test_the_choice_is_a_frozen_value_with_checked_fields():
    choice = select_engine(make_tiny_vit(), "chefer")
    assert isinstance(choice, EngineChoice)
    assert (choice.kind, choice.engine, choice.method, choice.model) == (
        "chunked",
        "auto",
        "chefer",
        "VisionTransformer",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.kind = "dense"
    with pytest.raises(ValueError, match=r"Expected kind one of \('chunked', 'dense'\)"):
        EngineChoice("flash", "")
    with pytest.raises(ValueError, match=r"Expected engine one of .*, but got 'flash'"):
        select_engine(make_tiny_vit(), "chefer", "flash")
    with pytest.raises(ValueError, match=r"Expected chunk_size an int >= 1 or None, but got 0"):
        select_engine(make_tiny_vit(), "chefer", "dense", chunk_size=0)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("chefer", {}),
        ("chefer", {"gradient": "logits", "start_layer": 1}),
        ("rollout", {}),
        ("raw_attention", {}),
    ],
)
def test_the_chunked_and_dense_engines_agree(any_vit, method, options):
    x = images_for(any_vit)
    target = torch.tensor([0, 3, 1])
    dense = explain(any_vit, x, method, target=target, engine="dense", **options)
    unfused, x64 = in_float64(any_vit, x, fused=False)
    fused = in_float64(any_vit, fused=True)[0]

    @functools.cache
    def rounding(model, **kw):  # one engine's float32 rounding
        return rounding_bound(lambda: explain(model, x64, method, target=target, **kw, **options))

    for chunk_size in (1, 5, None):
        chunked = explain(
            any_vit, x, method, target=target, engine="chunked", chunk_size=chunk_size, **options
        )

        # the same float32 sums in the two engines' orders: within both engines' rounding
        def bound(c=chunk_size):
            return rounding(unfused) + rounding(fused, engine="chunked", chunk_size=c)

        assert_within(chunked, dense, bound, f"chunk_size={chunk_size}")
    auto = explain(any_vit, x, method, target=target, **options)
    assert torch.equal(
        auto, explain(any_vit, x, method, target=target, engine="chunked", **options)
    )
    assert dense.abs().max() > 0


def test_auto_on_an_unreadable_model_gives_the_dense_maps_exactly():
    model = _no_blocks(torch.float32)
    x = images_for(model)
    for method in ("chefer", "rollout", "raw_attention"):
        assert torch.equal(explain(model, x, method), explain(model, x, method, engine="dense"))
