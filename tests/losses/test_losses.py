"""Losses against hand-computed values and per-sample references; masking; errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from relreg.explain import explain, to_pixels
from relreg.losses import (
    CFTLoss,
    ClassificationLoss,
    RobustViTLoss,
    RRRLoss,
    cft_loss,
    classification_loss,
    relevance_mass_loss,
    robustvit_loss,
    rrr_loss,
)
from tests.conftest import images_for, make_tiny_vit


def _rand(b=4, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, generator=g), (torch.rand(b, h, w, generator=g) > 0.6).float()


def test_relevance_loss_hand_computed():
    r = torch.tensor([[[0.8, 0.2], [0.4, 1.0]]])
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    out = robustvit_loss(r, s)
    bg = (0.2**2 + 0.4**2) / 4
    fg = ((0.8 - 1) ** 2 + 0.0) / 4
    assert out["loss_bg"].item() == pytest.approx(bg)
    assert out["loss_fg"].item() == pytest.approx(fg)
    assert out["loss"].item() == pytest.approx(2.0 * bg + 0.3 * fg)


def test_relevance_loss_equals_torch_mse_and_weights():
    r, s = _rand()
    out = robustvit_loss(r, s, lambda_bg=1.5, lambda_fg=0.7)
    bg = F.mse_loss(r * (1 - s), torch.zeros_like(r))
    fg = F.mse_loss(r * s, s)
    torch.testing.assert_close(out["loss_bg"], bg)
    torch.testing.assert_close(out["loss_fg"], fg)
    torch.testing.assert_close(out["loss"], 1.5 * bg + 0.7 * fg)


def test_cft_loss_is_cfts_bce_terms():
    """CFT's scripts/train.py: BCELoss(mean)(R * (1 - S), 0) and BCELoss(mean)(R * S, S),
    weighted lambda_ctx = 1.2 and lambda_concept = 0.5; written here with the logs by hand."""
    r, s = _rand()
    out = cft_loss(r, s)

    def bce(p, t):
        return -(t * p.log().clamp_min(-100) + (1 - t) * (1 - p).log().clamp_min(-100)).mean()

    ctx, concept = bce(r * (1 - s), torch.zeros_like(s)), bce(r * s, s)
    torch.testing.assert_close(out["loss_bg"], ctx)
    torch.testing.assert_close(out["loss_fg"], concept)
    torch.testing.assert_close(out["loss"], 1.2 * ctx + 0.5 * concept)
    module = CFTLoss(lambda_ctx=2.0, lambda_concept=0.0)
    torch.testing.assert_close(module(r, s)["loss"], 2.0 * ctx)
    # a perfect map (1 on the mask, 0 elsewhere) costs nothing; the squared error differs
    assert cft_loss(s, s)["loss"].item() == 0.0
    assert not torch.allclose(out["loss_bg"], robustvit_loss(r, s)["loss_bg"])


def test_cft_loss_refuses_relevance_outside_0_1():
    r, s = _rand()
    with pytest.raises(ValueError, match=r"relevance in \[0, 1\].*to_pixels"):
        cft_loss(r * 2, s)


@pytest.mark.parametrize("fn", [robustvit_loss, cft_loss, relevance_mass_loss, rrr_loss])
def test_unmasked_samples_contribute_nothing(fn):
    r, s = _rand()
    has = torch.tensor([True, False, True, False])
    mixed = fn(r, s, has_mask=has)
    only = fn(r[has], s[has])
    for k in ("loss", "loss_bg", "loss_fg"):
        torch.testing.assert_close(mixed[k], only[k])
    # changing an unmasked sample's relevance changes nothing
    r2 = r.clone()
    r2[1] = 0.3
    torch.testing.assert_close(fn(r2, s, has_mask=has)["loss"], mixed["loss"])


@pytest.mark.parametrize("fn", [robustvit_loss, cft_loss, relevance_mass_loss, rrr_loss])
def test_no_mask_at_all_gives_zero_in_the_graph(fn):
    r, s = _rand()
    r.requires_grad_(True)
    out = fn(r, s, has_mask=torch.zeros(4, dtype=torch.bool))
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    out["loss"].backward()
    assert torch.equal(r.grad, torch.zeros_like(r))


def test_relevance_mass_loss_is_fraction_outside():
    r = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    s = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert relevance_mass_loss(r, s)["loss"].item() == pytest.approx(3.0 / 4.0)
    with pytest.raises(ValueError, match="non-negative"):
        relevance_mass_loss(-r, s)


def test_rrr_on_a_real_input_gradient_path():
    model = make_tiny_vit()
    x = images_for(model)
    masks = torch.zeros(3, 16, 16)
    masks[:, 4:12, 4:12] = 1
    grads = explain(model, x, "saliency", target=0, differentiable=True)
    RRRLoss()(grads, masks)["loss"].backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0  # second-order path to the weights


def test_robustvit_loss_reaches_model_weights_through_chefer():
    model = make_tiny_vit()
    x = images_for(model)
    masks = torch.zeros(3, 16, 16)
    masks[:, :8] = 1
    pix = to_pixels(explain(model, x, "chefer", target=1, differentiable=True), size=(16, 16))
    RobustViTLoss()(pix, masks)["loss"].backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_classification_self_label_teacher():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0])
    t = 0.55
    torch.testing.assert_close(
        classification_loss(logits, "self", temperature=t),
        F.cross_entropy(logits / t, logits.argmax(1)),
    )
    torch.testing.assert_close(
        classification_loss(logits, "label", labels=labels), F.cross_entropy(logits, labels)
    )
    teacher = torch.randn(5, 4, generator=g)
    ref = (
        sum(
            (
                F.softmax(teacher[i] / 2, 0)
                * (F.log_softmax(teacher[i] / 2, 0) - F.log_softmax(logits[i] / 2, 0))
            ).sum()
            for i in range(5)
        )
        / 5
        * 4
    )
    torch.testing.assert_close(
        classification_loss(logits, "teacher", teacher_logits=teacher, temperature=2.0), ref
    )
    assert classification_loss(teacher, "teacher", teacher_logits=teacher).abs().item() < 1e-6
    assert ClassificationLoss("label")(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels).item()
    )


def test_self_target_is_a_constant():
    logits = torch.randn(3, 4, requires_grad=True)
    classification_loss(logits, "self").backward()
    ref = torch.softmax(logits.detach(), 1) - F.one_hot(logits.detach().argmax(1), 4)
    torch.testing.assert_close(logits.grad, ref / 3)


@pytest.mark.parametrize(
    "relevance, masks, match",
    [
        (
            torch.rand(2, 4, 4),
            torch.rand(2, 5, 4),
            r"masks of the relevance's shape \(2, 4, 4\), but got \(2, 5, 4\)",
        ),
        (
            torch.rand(2, 4, 4),
            torch.full((2, 4, 4), 255.0),
            r"mask values in \[0, 1\], but got values in \[255, 255\]",
        ),
        (torch.full((2, 4, 4), float("nan")), torch.zeros(2, 4, 4), "finite relevance"),
        (torch.rand(4, 4), torch.rand(4, 4), r"relevance of shape \(B, H, W\)"),
    ],
)
def test_input_errors(relevance, masks, match):
    with pytest.raises(ValueError, match=match):
        robustvit_loss(relevance, masks)


def test_dtype_and_has_mask_errors():
    with pytest.raises(TypeError, match="masks of a floating dtype"):
        robustvit_loss(torch.rand(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"has_mask a bool tensor of shape \(1,\)"):
        robustvit_loss(torch.rand(1, 2, 2), torch.ones(1, 2, 2), has_mask=torch.ones(1))


def test_classification_errors():
    logits = torch.randn(2, 3)
    with pytest.raises(ValueError, match="mode one of"):
        classification_loss(logits, "soft")
    with pytest.raises(ValueError, match="labels of shape"):
        classification_loss(logits, "label")
    with pytest.raises(ValueError, match="teacher_logits of shape"):
        classification_loss(logits, "teacher")
    with pytest.raises(ValueError, match="temperature > 0"):
        classification_loss(logits, temperature=0.0)
