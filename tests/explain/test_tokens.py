"""to_pixels, min_max and the patch grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from relreg.explain import min_max, patch_grid, to_pixels
from tests.conftest import make_tiny_vit


def test_upsampling_is_bilinear_align_corners_false():
    maps = torch.rand(2, 3, 5)
    out = to_pixels(maps, size=(12, 20), normalize=False)
    ref = F.interpolate(maps[:, None], size=(12, 20), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out, ref)


def test_normalised_maps_span_zero_to_one_per_image():
    maps = torch.randn(4, 7, 7) * torch.tensor([1.0, 10.0, 100.0, 0.01]).view(4, 1, 1)
    out = to_pixels(maps, size=(14, 14))
    torch.testing.assert_close(out.flatten(1).amin(1), torch.zeros(4))
    torch.testing.assert_close(out.flatten(1).amax(1), torch.ones(4))


def test_constant_map_gives_zeros_not_nan():
    out = to_pixels(torch.full((2, 4, 4), 3.0), size=(8, 8))
    assert torch.equal(out, torch.zeros(2, 8, 8))


def test_pixel_maps_pass_through():
    maps = torch.rand(2, 16, 16)
    assert torch.equal(to_pixels(maps, size=(16, 16), normalize=False), maps)


def test_min_max_is_invariant_to_affine_changes():
    maps = torch.rand(3, 6, 6)
    torch.testing.assert_close(min_max(maps), min_max(5 * maps + 2))


def test_to_pixels_is_differentiable():
    maps = torch.rand(2, 4, 4, requires_grad=True)
    to_pixels(maps, size=(8, 8)).sum().backward()
    assert maps.grad is not None


@pytest.mark.parametrize("bad", [torch.rand(4, 4), torch.rand(1, 1, 4, 4)])
def test_to_pixels_rejects_wrong_rank(bad):
    with pytest.raises(ValueError, match=r"maps of shape \(B, h, w\)"):
        to_pixels(bad, size=(8, 8))


def test_to_pixels_rejects_non_tensor():
    with pytest.raises(TypeError, match="maps to be a torch.Tensor"):
        to_pixels([[1.0]], size=(8, 8))


def test_patch_grid_non_square_and_mismatch():
    model = make_tiny_vit(img_size=(12, 20))
    assert patch_grid(model, (12, 20), 15) == (3, 5)
    with pytest.raises(ValueError, match="Expected 16 patch tokens"):
        patch_grid(model, (12, 20), 16)


def test_average_pooled_model_reads_out_the_mean_of_patch_rows():
    from relreg.explain import AttentionCapture, explain

    model = make_tiny_vit(global_pool="avg", class_token=False)
    x = torch.randn(2, 3, 16, 16)
    with AttentionCapture(model) as cap:
        model(x)
    ref = cap.attentions[-1].mean(1).mean(1)  # mean over the (all patch) rows
    torch.testing.assert_close(explain(model, x, "raw_attention").flatten(1), ref)


def test_an_attention_pool_over_the_patch_tokens_leaves_the_class_token_out():
    from relreg.explain import explain

    model = make_tiny_vit(global_pool="map", dtype=torch.float64)  # a class token and a pool
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for method in ("chefer", "rollout", "raw_attention"):
        dense = explain(model, x, method, engine="dense")
        torch.testing.assert_close(explain(model, x, method, engine="chunked"), dense)
    with pytest.raises(ValueError, match="global_pool='map'"):
        explain(model, x, "gradcam")  # a fixed token mix only
