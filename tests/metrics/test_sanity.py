"""Model-randomisation sanity checks (Adebayo et al., NeurIPS 2018)."""

from __future__ import annotations

import pytest
import torch

from relreg.metrics.sanity import _hog, _similarities, model_randomisation, randomisation_steps
from tests.conftest import images_for, make_tiny_vit, model_state
from tests.numerics import U32, U64, assert_within, probable_sum_bound


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


EPS = 1e-6  # torchmetrics' spearman_corrcoef: cov / (std_a std_b + 1e-6)


def _spearman_bound(ra: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    """Bound on the error of torchmetrics' float32 Spearman correlation of ranks ``ra``, ``rb``
    against the float64 Pearson correlation of the ranks."""
    da, db = ra - ra.mean(), rb - rb.mean()
    n = len(ra)
    cov, va, vb = (da * db).mean(), (da * da).mean(), (db * db).mean()
    std = (va * vb).sqrt()
    rho = (cov / std).abs()
    # the float32 means of the centred products and squares (a variance's error halves in its
    # root), then the roots, their product and the division (3 roundings), and the 1e-6
    e_cov, e_va, e_vb = (probable_sum_bound(t) / n for t in (da * db, da * da, db * db))
    float32 = e_cov / std + rho * (e_va / (2 * va) + e_vb / (2 * vb) + 3 * U32 + EPS / std)
    return float32 + probable_sum_bound(da * db, u=U64) / n / std  # the float64 reference's


def test_steps_run_from_the_head_down_and_the_model_is_left_alone():
    model = make_tiny_vit(depth=3)
    assert randomisation_steps(model) == ["head", "norm", "blocks.2", "blocks.1", "blocks.0",
                                          "patch_embed"]  # fmt: skip
    model.train()
    before = model_state(model)
    result = model_randomisation(model, images_for(model, batch=2), "raw_attention")
    assert model_state(model) == before
    assert result.maps.shape == (7, 2, 16, 16) and result.similarity["ssim"].shape == (6, 2)


def test_head_randomisation_moves_gradient_maps_but_not_rollout():
    """Rollout never reads the head; Chefer's rule weighs attention by the head's gradient."""
    model = make_tiny_vit()
    x = images_for(model, batch=3)
    rollout = model_randomisation(model, x, "rollout", steps=["head"])
    assert torch.allclose(rollout.similarity["spearman"], torch.ones(1, 3))
    chefer = model_randomisation(model, x, "chefer", steps=["head"])
    assert chefer.similarity["spearman"].max() < 0.99
    # the last step of a full cascade randomises everything: rollout then changes too
    full = model_randomisation(model, x, "rollout")
    assert full.similarity["spearman"][-1].mean() < 0.9


def test_orders_seed_and_errors():
    model = make_tiny_vit()
    x = images_for(model, batch=2)
    cascade = model_randomisation(model, x, "saliency", seed=3)
    alone = model_randomisation(model, x, "saliency", order="independent", seed=3)
    # the first step randomises the head from the same weights and noise in both orders
    torch.testing.assert_close(cascade.maps[:2], alone.maps[:2])
    again = model_randomisation(model, x, "saliency", seed=3)
    torch.testing.assert_close(again.maps, cascade.maps, atol=0, rtol=0)
    assert cascade.summary()["steps"][0] == "head" and len(cascade.summary()["ssim"]) == 5
    with pytest.raises(ValueError, match="order"):
        model_randomisation(model, x, "saliency", order="top-down")
    with pytest.raises(ValueError, match=r"steps among .*\['decoder'\]"):
        model_randomisation(model, x, "saliency", steps=["decoder"])


def test_similarities_equal_naive_formulas():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 16, 16, generator=gen), torch.rand(3, 16, 16, generator=gen)
    sims = _similarities(a, b, a, b)
    for i in range(3):
        ra, rb = _ranks(a[i].flatten()), _ranks(b[i].flatten())
        pearson = torch.corrcoef(torch.stack([ra, rb]))[0, 1]
        assert_within(sims["spearman"][i], pearson, _spearman_bound(ra, rb), f"spearman {i}")
    # a map against itself: cov = var exactly, var / (sqrt(var)^2 + 1e-6) off 1 by the root, the
    # product, the division and the 1e-6 (ranks of 256 values: var = (256^2 - 1) / 12); SSIM and
    # HOG's correlation, float64, only by the cast to float32
    one = 3 * U32 + EPS / ((256**2 - 1) / 12)
    same = _similarities(a, a, a, a)
    for name in ("spearman", "spearman_abs", "ssim", "hog"):
        assert_within(same[name].float(), torch.ones(3), one, name)
    flipped = _similarities(a, -a, a, a)
    assert_within(flipped["spearman"].float(), -torch.ones(3), one, "flipped")
    assert_within(flipped["spearman_abs"].float(), torch.ones(3), one, "flipped abs")
    # HOG: a vertical edge and a horizontal edge have orthogonal orientation histograms
    v = torch.zeros(1, 16, 16)
    v[:, :, 8:] = 1
    assert _hog(v)[0] @ _hog(v.transpose(1, 2))[0] < 1e-6


def test_attention_pooled_models_randomise_every_parameter_and_seed_reaches_the_explainer():
    model = make_tiny_vit(global_pool="map")
    steps = randomisation_steps(model)
    names = [n for n, _ in model.named_parameters()]
    from relreg.metrics.sanity import _part

    covered = {
        n for n in names for s in steps for pre in _part(s) if n == pre or n.startswith(pre + ".")
    }
    assert covered == set(names)  # attn_pool included
    x = images_for(model, batch=2)
    a = model_randomisation(make_tiny_vit(), x, "lime", steps=["head"], seed=1, n_samples=16)
    b = model_randomisation(make_tiny_vit(), x, "lime", steps=["head"], seed=2, n_samples=16)
    assert not torch.equal(a.maps[0], b.maps[0])  # the explainer's own seed follows
