"""Background counterfactuals: a per-sample reference, the foreground kept, the loss's direction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from relreg.data import make_shapes
from relreg.losses import counterfactual_loss, swap_backgrounds


def _reference(images, masks, shift):
    out = torch.empty_like(images)
    b = images.shape[0]
    for i in range(b):
        j = (i - shift) % b
        m, mo = masks[i].bool(), masks[j].bool()
        donor = images[j].clone()
        for c in range(images.shape[1]):
            donor[c][mo] = images[j, c][~mo].mean() if (~mo).any() else 0.0
        out[i] = torch.where(m, images[i], donor)
    return out


@pytest.mark.parametrize("shift", [1, 2, 5])
def test_swap_backgrounds_matches_a_per_sample_loop(shift):
    batch = make_shapes(5, size=16, seed=1, spurious=1.0)
    got = swap_backgrounds(batch.images, batch.masks, shift)
    torch.testing.assert_close(got, _reference(batch.images, batch.masks, shift))


def test_swap_keeps_the_foreground_and_takes_the_other_background():
    batch = make_shapes(4, size=16, seed=2, spurious=1.0, cue="marker")
    got = swap_backgrounds(batch.images, batch.masks)
    fg = batch.masks.bool().unsqueeze(1).expand_as(got)
    assert torch.equal(got[fg], batch.images[fg])
    both_bg = ~(batch.masks.bool() | batch.masks.roll(1, 0).bool())
    for i in range(4):
        assert torch.equal(got[i][:, both_bg[i]], batch.images[i - 1][:, both_bg[i]])
    # the marker (in the background) now belongs to the other image
    assert not torch.equal(got[:, :, :2, :2], batch.images[:, :, :2, :2])
    assert torch.equal(swap_backgrounds(batch.images[:1], batch.masks[:1]), batch.images[:1])


def test_swap_errors():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"images of shape \(B, C, H, W\)"):
        swap_backgrounds(x[0], torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"masks of shape \(2, 4, 4\).*\(2, 8, 8\)"):
        swap_backgrounds(x, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="mask values in"):
        swap_backgrounds(x, torch.full((2, 4, 4), 255.0))


def test_counterfactual_loss_is_kl_with_a_fixed_target():
    torch.manual_seed(0)
    z = torch.randn(6, 4, requires_grad=True)
    zc = torch.randn(6, 4, requires_grad=True)
    loss = counterfactual_loss(z, zc)
    p = F.softmax(z.detach(), 1)
    ref = (p * (p.log() - F.log_softmax(zc.detach(), 1))).sum(1).mean()
    torch.testing.assert_close(loss.detach(), ref)
    loss.backward()
    assert z.grad is None and zc.grad.abs().sum() > 0
    assert counterfactual_loss(z, z.detach().clone()).abs().item() < 1e-7


def test_counterfactual_loss_errors():
    with pytest.raises(ValueError, match=r"logits of shape \(B, K\)"):
        counterfactual_loss(torch.zeros(3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"counterfactual_logits of the logits' shape \(3, 2\)"):
        counterfactual_loss(torch.zeros(3, 2), torch.zeros(3, 4))
