"""AttentionCapture: records the right tensors, changes nothing, cleans up on every exit."""

from __future__ import annotations

import pytest
import torch
import torchvision

from relreg.explain import AttentionCapture, find_attention_modules
from tests.conftest import images_for, make_tiny_vit, model_state
from tests.numerics import assert_within, fused_unfused_bound


def test_records_softmax_probabilities_of_every_block():
    model = make_tiny_vit(depth=3)
    x = images_for(model, batch=2)
    with AttentionCapture(model) as cap:
        model(x)
    assert len(cap.attentions) == 3
    for a in cap.attentions:
        assert a.shape == (2, 2, 17, 17)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 17))


def test_unfused_output_equals_fused_output():
    model = make_tiny_vit()
    for m in find_attention_modules(model):
        m.fused_attn = True
    x = images_for(model)
    fused = model(x)
    with AttentionCapture(model):
        unfused = model(x)
    # the fused kernel and the unfused products: the same float32 sums in two orders
    assert_within(fused, unfused, lambda: fused_unfused_bound(model, x))


@pytest.mark.parametrize("fused", [True, False])
def test_flags_and_hooks_restored(fused):
    model = make_tiny_vit()
    for m in find_attention_modules(model):
        m.fused_attn = fused
    before = model_state(model)
    with AttentionCapture(model):
        assert all(m.fused_attn is False for m in find_attention_modules(model))
        model(images_for(model))
    assert model_state(model) == before


def test_restored_after_exception():
    model = make_tiny_vit()
    before = model_state(model)
    with pytest.raises(KeyError), AttentionCapture(model):
        raise KeyError("inside")
    assert model_state(model) == before


def test_not_reentrant_and_reusable():
    model = make_tiny_vit()
    cap = AttentionCapture(model)
    with cap, pytest.raises(RuntimeError, match="re-entrant"), cap:
        pass
    with cap:
        model(images_for(model))
    assert len(cap.attentions) == 2
    cap.clear()
    assert cap.attentions == []


def test_model_without_attention_is_rejected_with_a_clear_error():
    cnn = torchvision.models.resnet18(num_classes=3)
    with pytest.raises(ValueError, match="qkv, attn_drop, fused_attn, num_heads.*ResNet"):
        AttentionCapture(cnn)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        find_attention_modules("vit")
