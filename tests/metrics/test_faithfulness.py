"""Perturbation and deletion/insertion AUCs against naive one-image-at-a-time references."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from relreg.metrics import DeletionInsertionAUC, PerturbationAUC
from relreg.metrics.functional import PAPER_FRACTIONS, black_fill
from tests.conftest import images_for, make_tiny_vit
from tests.numerics import U32, U64, assert_within, in_float64, sum_bound, twin_bound


def _naive_pixel_scores(m, size):
    return F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[
        0, 0
    ].flatten()


def _naive_perturbation(model, images, maps, labels, mode, fill, target_mode):
    """The CVPR 2021 test, one image and one fraction at a time."""
    h, w = images.shape[-2:]
    curves = []
    for x, m, y in zip(images, maps, labels, strict=True):
        with torch.no_grad():
            pred = model(x[None]).argmax(1).item()
        t = pred if target_mode == "predicted" else int(y)
        scores = _naive_pixel_scores(m, (h, w))
        order = torch.argsort(scores, descending=mode == "positive", stable=True)
        row = [float(pred == t)]
        for p in PAPER_FRACTIONS:
            x2 = x.clone().view(3, -1)
            idx = order[: int(p * h * w)]
            x2[:, idx] = fill.view(3, 1)
            with torch.no_grad():
                row.append(float(model(x2.view(1, 3, h, w)).argmax(1).item() == t))
        curves.append(row)
    acc = np.mean(curves, axis=0)
    return np.trapezoid(acc, [0.0, *PAPER_FRACTIONS]) * 100, acc


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("target_mode", ["predicted", "label"])
def test_perturbation_auc_equals_naive_loop(mode, target_mode):
    model = make_tiny_vit(num_classes=3)
    x = images_for(model, batch=5)
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(5, 4, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1])
    metric = PerturbationAUC(model, mode=mode, target_mode=target_mode, chunk_size=7)
    metric.update(x[:2], maps[:2], labels[:2])
    metric.update(x[2:], maps[2:], labels[2:])
    auc, acc = _naive_perturbation(model, x, maps, labels, mode, black_fill(model), target_mode)
    # float64 accuracies and trapezoid (the reference's too), rounded once to float32
    acc, auc = torch.as_tensor(acc), torch.as_tensor(auc)
    assert_within(metric.compute(), auc, U32 * auc + 2 * 100 * sum_bound(acc, u=U64), "auc")
    assert_within(metric.curve(), acc, U32 * acc + 2 * U64 * acc, "curve")


def test_black_fill_is_normalised_zero():
    model = make_tiny_vit()  # timm's default ViT config: mean = std = 0.5
    torch.testing.assert_close(black_fill(model), torch.full((3,), -1.0))


def test_patch_unit_removes_whole_patches():
    model = make_tiny_vit(num_classes=3)
    x = images_for(model, batch=2)
    metric = PerturbationAUC(model, unit="patch", fractions=(0.25,), fill=0.0)
    seen = []
    handle = model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    metric.update(x, torch.rand(2, 4, 4))
    handle.remove()
    perturbed = seen[-1]
    changed = (perturbed != x).any(1)  # (B, H, W)
    per_patch = changed.view(2, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(2, 16, 16)
    assert torch.all(per_patch.all(-1) | ~per_patch.any(-1))  # each patch all or nothing
    assert per_patch.any(-1).sum(1).tolist() == [4, 4]  # 25% of 16 patches


class Quadrant(torch.nn.Module):
    """A "model" whose class-1 logit is the mean of the top-left 8 x 8 quadrant."""

    def forward(self, x):
        s = x[:, :, :8, :8].mean((1, 2, 3))
        return torch.stack([torch.zeros_like(s), s], 1)


def test_perfect_map_beats_inverted_on_a_model_that_reads_one_region():
    # a "model" whose class-1 logit is the mean of the top-left quadrant: removing it flips the
    # decision
    x = torch.ones(4, 3, 16, 16)
    good = torch.zeros(4, 16, 16)
    good[:, :8, :8] = 1
    pos_good, pos_bad = (
        PerturbationAUC(Quadrant(), fill=-1.0),
        PerturbationAUC(Quadrant(), fill=-1.0),
    )
    pos_good.update(x, good)
    pos_bad.update(x, 1 - good)
    assert pos_good.compute() < pos_bad.compute()
    deletion = DeletionInsertionAUC(Quadrant(), mode="deletion", fill=-1.0, steps=4)
    deletion.update(x, good)
    insertion = DeletionInsertionAUC(Quadrant(), mode="insertion", fill=-1.0, steps=4)
    insertion.update(x, good)
    assert deletion.compute() < insertion.compute()


def _rise_bound(model64, bases, targets, ref, steps=5):
    """Bound on the RISE AUC's float32 error: each image's probability from float32 forward passes
    batched two ways (:func:`twin_bound`), their float64 mean and trapezoid (weights ``1 / steps``,
    halved at the ends), rounded once to float32."""
    w = torch.ones(steps + 1, dtype=torch.float64) / steps
    w[[0, -1]] /= 2

    def probs():
        with torch.no_grad():
            out = model64(bases.double()).softmax(1)
        return out[torch.arange(len(targets)), targets].view(-1, steps + 1)

    return (w * twin_bound(probs).mean(0)).sum() + U32 * abs(ref)


def test_deletion_insertion_equal_naive_loop():
    model = make_tiny_vit(num_classes=3)
    x = images_for(model, batch=3)
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(4))
    fill = black_fill(model)
    model64 = in_float64(model)[0]
    for mode in ("deletion", "insertion"):
        metric = DeletionInsertionAUC(model, mode=mode, steps=5)
        metric.update(x, maps)
        rows, bases, targets = [], [], []
        for xi, m in zip(x, maps, strict=True):
            with torch.no_grad():
                t = model(xi[None]).argmax(1).item()
            order = torch.argsort(m.flatten(), descending=True, stable=True)
            row = []
            for f in np.linspace(0, 1, 6):
                idx = order[: int(f * 256)]
                base = (
                    xi.clone().view(3, -1) if mode == "deletion" else fill.view(3, 1).repeat(1, 256)
                )
                base[:, idx] = fill.view(3, 1) if mode == "deletion" else xi.view(3, -1)[:, idx]
                with torch.no_grad():
                    row.append(model(base.view(1, 3, 16, 16)).softmax(1)[0, t].item())
                bases.append(base.view(3, 16, 16))
                targets.append(t)
            rows.append(row)
        ref = np.trapezoid(np.mean(rows, 0), np.linspace(0, 1, 6))

        bound = partial(_rise_bound, model64, torch.stack(bases), torch.tensor(targets), ref)
        assert_within(metric.compute(), torch.as_tensor(ref), bound, mode)


def test_merge_state_and_no_weights_in_state_dict():
    model = make_tiny_vit(num_classes=3)
    x = images_for(model, batch=4)
    maps = torch.rand(4, 4, 4)
    whole, a, b = (PerturbationAUC(model) for _ in range(3))
    whole.update(x, maps)
    a.update(x[:1], maps[:1])
    b.update(x[1:], maps[1:])
    a.merge_state(b)
    torch.testing.assert_close(a.compute(), whole.compute())
    assert not any("head" in k for k in whole.state_dict())
    assert (
        PerturbationAUC(model, mode="negative").higher_is_better
        and not PerturbationAUC(model).higher_is_better
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "both"}, "mode 'positive' or 'negative'"),
        ({"unit": "token"}, "unit 'pixel' or 'patch'"),
        ({"target_mode": "top5"}, "target_mode"),
        ({"fractions": (0.5, 0.2)}, "increasing fractions"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerturbationAUC(make_tiny_vit(), **kwargs)


def test_update_errors():
    model = make_tiny_vit()
    metric = PerturbationAUC(model, target_mode="label")
    x = images_for(model, batch=2)
    with pytest.raises(ValueError, match="target"):
        metric.update(x, torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="maps"):
        metric.update(x, torch.rand(3, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="model"):
        PerturbationAUC("vit")


@pytest.mark.parametrize("unit", ["pixel", "patch"])
def test_functional_twins_equal_the_metric_classes_on_one_batch(unit):
    from relreg.metrics import deletion_insertion_auc, perturbation_auc

    model = make_tiny_vit(num_classes=3)
    x = images_for(model, batch=4)
    maps = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 0])
    for mode in ("positive", "negative"):
        metric = PerturbationAUC(model, mode=mode, unit=unit, target_mode="label")
        metric.update(x, maps, labels)
        twin = perturbation_auc(model, x, maps, labels, mode=mode, unit=unit, target_mode="label")
        assert twin.item() == metric.compute().item()  # the same computation on the same batch
    for mode in ("deletion", "insertion"):
        metric = DeletionInsertionAUC(model, mode=mode, unit=unit, steps=4)
        metric.update(x, maps)
        twin = deletion_insertion_auc(model, x, maps, mode=mode, unit=unit, steps=4)
        assert twin.item() == metric.compute().item()  # the same computation on the same batch


def test_functional_twins_check_their_arguments():
    from relreg.metrics import deletion_insertion_auc, perturbation_auc

    model = make_tiny_vit(num_classes=3)
    x, maps = images_for(model, batch=2), torch.rand(2, 4, 4)
    with pytest.raises(
        ValueError, match="Expected mode 'positive' or 'negative', but got 'deletion'"
    ):
        perturbation_auc(model, x, maps, mode="deletion")
    with pytest.raises(ValueError, match="Expected steps an int >= 1, but got 0"):
        deletion_insertion_auc(model, x, maps, steps=0)
    with pytest.raises(ValueError, match="Expected target"):
        perturbation_auc(model, x, maps, target_mode="label")


def test_flipping_area_on_a_model_that_reads_one_region():
    """AttnLRP's faithfulness measure by hand: the class-1 logit is the mean of the top-left
    quadrant (a quarter of the pixels), pixels removed to -1. MoRF with the right map: 1 - 8f up to
    f = 1/4, then -1; LeRF: 1 up to f = 3/4, then down to -1 at f = 1. At fractions 0, 1/4, ..., 1
    the difference LeRF - MoRF is 0, 2, 2, 2, 0: area 1.5 by the trapezoid rule; the inverted map
    gives -1.5."""
    from relreg.metrics import FlippingArea
    from relreg.metrics.functional import flipping_area

    x = torch.ones(4, 3, 16, 16)
    good = torch.zeros(4, 16, 16)
    good[:, :8, :8] = 1
    area = partial(flipping_area, Quadrant(), x, unit="pixel", fill=-1.0, steps=4)
    assert area(good).item() == 1.5 and area(1 - good).item() == -1.5
    metric = FlippingArea(Quadrant(), unit="pixel", fill=-1.0, steps=4)
    metric.update(x[:1], good[:1])
    metric.update(x[1:], 1 - good[1:])  # two batches: the mean over the four images
    assert metric.compute().item() == pytest.approx((1.5 - 3 * 1.5) / 4)
    torch.testing.assert_close(metric.curve()[[0, -1]], torch.zeros(2))
