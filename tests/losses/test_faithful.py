"""The faithfulness anchor against per-image references, its properties and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from relreg.losses import (
    background_effect_share,
    faithfulness_loss,
    occlude_foreground,
    swap_backgrounds,
)


class _RegionReader(torch.nn.Module):
    """Logits from the pixels of a fixed region only (a linear read-out of them)."""

    def __init__(self, region: torch.Tensor, classes: int = 3) -> None:
        super().__init__()
        self.region = region
        self.linear = torch.nn.Linear(3 * region.numel(), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x * self.region).flatten(1))


def _data(b=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g)
    masks = torch.zeros(b, size, size)
    masks[:, 2:6, 2:6] = 1  # the same object region in every image
    return images, masks, torch.randint(0, 3, (b,), generator=g)


def test_effect_share_equals_a_per_image_reference():
    torch.manual_seed(0)
    images, masks, target = _data()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 3))
    share = background_effect_share(model, images, masks, target, model(images))
    for i in range(4):
        other, m = images[i - 1], masks[i][None]
        bg = 1 - masks[i - 1][None]
        fill = (other * bg).sum((1, 2), keepdim=True) / bg.sum()
        x_bg = m * images[i] + (1 - m) * (other * bg + fill * (1 - bg))
        own_fill = (images[i] * (1 - m)).sum((1, 2), keepdim=True) / (1 - m).sum()
        x_fg = images[i] * (1 - m) + own_fill * m
        logp = lambda x, t=int(target[i]): F.log_softmax(model(x[None]), 1)[0, t]  # noqa: E731
        d_bg = (logp(images[i]) - logp(x_bg)).abs()
        d_fg = (logp(images[i]) - logp(x_fg)).abs()
        torch.testing.assert_close(share[i], (d_bg + 5e-7) / (d_bg + d_fg + 1e-6))
    torch.testing.assert_close(swap_backgrounds(images, masks)[3], x_bg)  # the last i


def test_models_reading_only_the_object_or_only_the_background():
    images, masks, target = _data()
    only_object = _RegionReader(masks[0])
    only_background = _RegionReader(1 - masks[0])
    for model, expected in ((only_object, 0.0), (only_background, 1.0)):
        share = background_effect_share(model, images, masks, target, model(images))
        torch.testing.assert_close(share, torch.full((4,), expected), atol=1e-2, rtol=0)


def test_anchor_is_zero_for_a_faithful_map_and_trains_the_chosen_side():
    images, masks, target = _data()
    model = _RegionReader(1 - masks[0])  # reads the background only: effect share 1
    share = background_effect_share(model, images, masks, target, model(images))
    faithful_map = (1 - masks).clone()  # all relevance on the background
    assert faithfulness_loss(faithful_map, masks, share).item() < 1e-6
    for train, map_moves, decision_moves in (
        ("decision", False, True), ("both", True, True), ("map", True, False)
    ):  # fmt: skip
        model.zero_grad()
        pixels = (masks + 0.01).requires_grad_(True)  # a map that says "the object": unfaithful
        effect = background_effect_share(model, images, masks, target, model(images))
        loss = faithfulness_loss(pixels, masks, effect, train=train)
        loss.backward()
        assert loss.item() > 0.9
        assert (pixels.grad is not None and pixels.grad.abs().sum() > 0) == map_moves, train
        grad = model.linear.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == decision_moves, train


def test_occlude_foreground_keeps_the_background():
    images, masks, _ = _data()
    out = occlude_foreground(images, masks)
    bg = (1 - masks).bool()[:, None].expand_as(images)
    assert torch.equal(out[bg], images[bg])
    inside = out[:, :, 3, 3]
    torch.testing.assert_close(inside, (images * (1 - masks)[:, None]).sum((2, 3)) / 48)


def test_errors_name_the_argument():
    images, masks, target = _data(b=1)
    model = _RegionReader(masks[0])
    with pytest.raises(ValueError, match="at least 2 masked images"):
        background_effect_share(model, images, masks, target, model(images))
    with pytest.raises(ValueError, match="pixels and masks of one shape"):
        faithfulness_loss(torch.rand(2, 4, 4), torch.rand(2, 8, 8), torch.rand(2))
    with pytest.raises(
        ValueError, match=r"train to be one of \('decision', 'both', 'map'\), but got 'all'"
    ):
        faithfulness_loss(torch.rand(2, 4, 4), torch.rand(2, 4, 4), torch.rand(2), train="all")
