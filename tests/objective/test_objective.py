"""The objective's terms: the contract of every registered term, the step context, the config."""

from __future__ import annotations

import sys

import pytest
import torch

import relreg.objective.context as context_module
from relreg.data import SpuriousShapes
from relreg.models import build_model
from relreg.objective import (
    NEEDS,
    TERMS,
    ExplainerSpec,
    Objective,
    StepContext,
    Term,
    list_terms,
    register_term,
)

TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("vit_tiny_patch16_224", num_classes=4, **TINY)


def _batch(n=6, masked_fraction=1.0, seed=0):
    ds = SpuriousShapes("train", n=n, seed=seed, masked_fraction=masked_fraction)
    keys = ("image", "label", "mask", "has_mask", "group")
    return {k: torch.stack([ds[i][k] for i in range(n)]) for k in keys}


# the options a term cannot do without (SpuriousShapes' 4 x 4 groups)
REQUIRED = {"group_dro": {"num_groups": 16}}


def _line(name: str) -> dict:
    return {"term": name, "options": REQUIRED.get(name, {})}


class _Watched(StepContext):
    """A context that records which of the needs are read from outside the context itself."""

    _read: set[str]

    def __getattribute__(self, name):
        caller = sys._getframe(1).f_code.co_filename
        if name in NEEDS and caller not in (context_module.__file__, __file__):
            object.__getattribute__(self, "_read").add(name)
        return super().__getattribute__(name)


def _spec(term: Term) -> ExplainerSpec:
    method = getattr(term, "method", "chefer")
    return ExplainerSpec(method, {}, False, getattr(term, "normalize", True))


@pytest.mark.parametrize("name", list_terms())
def test_every_term_keeps_its_contract(name, model):
    term = Objective([_line(name)], model).terms[0]
    ctx = _Watched(model, _batch(), _spec(term), maps_on=True, training=True)
    ctx._read = set()
    assert term.applies(ctx)
    out = term(ctx)
    # its parts, key first, scalar tensors in the graph of the model
    assert tuple(out) == term.parts and term.parts[0] == term.key
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    out[term.key].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)
    # it reads only what it declares
    assert ctx._read <= term.needs, (ctx._read, term.needs)


@pytest.mark.parametrize("name", list_terms())
def test_a_term_that_cannot_run_gives_zeros(name, model):
    objective = Objective([_line(name)], model)
    term = objective.terms[0]
    batch = _batch(masked_fraction=0.0)
    batch["has_mask"][0] = True  # one masked sample: too few for the swapping terms
    ctx = StepContext(model, batch, _spec(term), maps_on=False, training=True)
    out = objective(ctx)
    if term.needs_maps or term.min_masked > 1:
        assert not term.applies(ctx)
        assert set(out.terms) == set(term.parts)
        assert all(v.item() == 0.0 for v in out.terms.values()) and out.loss.item() == 0.0
    else:
        assert out.loss.item() > 0


def test_terms_that_share_a_need_share_one_pass(model):
    objective = Objective([{"term": "robustvit"}, {"term": "mass"}, {"term": "classification"}])
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        ctx = StepContext(model, _batch(), ExplainerSpec(), maps_on=True, training=True)
        out = objective(ctx)
    finally:
        handle.remove()
    assert len(calls) == 1  # maps and logits of all three from one explained forward pass
    assert {"loss_seg", "loss_bg", "loss_fg", "loss_cls"} <= set(out.terms)


def test_validation_runs_the_validation_terms_only(model):
    specs = [{"term": "robustvit", "weight": 2.0}, {"term": "classification"}]
    objective = Objective([*specs, {"term": "counterfactual", "weight": 3.0}], model)
    batch = _batch()
    val = objective(StepContext(model, batch, ExplainerSpec(), maps_on=True, training=False))
    assert "loss_cf" not in val.terms
    torch.testing.assert_close(val.loss, 2.0 * val.terms["loss_seg"] + val.terms["loss_cls"])
    train = objective(StepContext(model, batch, ExplainerSpec(), maps_on=True, training=True))
    parts = train.terms
    expected = 2.0 * parts["loss_seg"] + parts["loss_cls"] + 3.0 * parts["loss_cf"]
    torch.testing.assert_close(train.loss, expected)


def test_registry_refuses_bad_terms():
    with pytest.raises(TypeError, match="Expected objective term 'x' a Term subclass"):
        register_term("x")(dict)
    with pytest.raises(ValueError, match=r"needs of objective term 'y' among .* \['teacher'\]"):

        @register_term("y")
        class _Bad(Term):
            needs = frozenset({"teacher"})

    with pytest.raises(ValueError, match="Expected a new objective term name, but 'robustvit'"):
        register_term("robustvit")(type("T", (Term,), {}))
    assert "x" not in TERMS and "y" not in TERMS
