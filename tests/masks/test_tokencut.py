"""TokenCut: the batched normalised cut equals TokenCut's own per-image SciPy steps (read from
``unsupervised_saliency_detection/object_discovery.py`` of YangtaoWANG95/TokenCut), the seed's
component equals ``scipy.ndimage.label``'s, and a ViT with planted keys gets the known object."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy import ndimage

from relreg.masks import TokenCut, normalized_cut, seed_component
from tests.masks.planted import GRID, SIZE, object_image, planted_vit


def tokencut_reference(features: np.ndarray, grid: tuple[int, int], tau=0.2, eps=1e-5):
    """TokenCut's steps for one image, as its ``ncut`` runs them (SciPy, float64)."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    a = f @ f.T
    w = np.where(a > tau, 1.0, eps)
    d = np.diag(w.sum(1))
    _, vectors = scipy.linalg.eigh(d - w, d, subset_by_index=[1, 2])
    v = vectors[:, 0]
    part = v > v.mean()
    seed = int(np.argmax(np.abs(v)))
    if not part[seed]:
        part = ~part
    labels, _ = ndimage.label(part.reshape(grid))
    return labels == labels.flat[seed]


def clustered_features(batch: int, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Patch features of a random blob on a background, with noise: a clear spectral gap."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    out = []
    for _ in range(batch):
        centres = torch.randn(2, 16, generator=g)
        r, c = (
            torch.randint(1, h - 3, (1,), generator=g),
            torch.randint(1, w - 3, (1,), generator=g),
        )
        label = torch.zeros(h, w, dtype=torch.long)
        label[r : r + 3, c : c + 2] = 1
        out.append(centres[label.flatten()] + 0.3 * torch.randn(h * w, 16, generator=g))
    return torch.stack(out)


def test_batched_cut_equals_tokencuts_per_image_scipy_steps():
    grid = (7, 9)
    features = clustered_features(6, grid)
    masks, vectors = normalized_cut(features, grid)
    assert masks.shape == (6, *grid) and vectors.shape == (6, *grid)
    for f, mask in zip(features, masks, strict=True):
        expected = tokencut_reference(f.double().numpy(), grid)
        assert expected.any() and not expected.all()
        np.testing.assert_array_equal(mask.numpy(), expected)


def test_the_cut_does_not_depend_on_the_batch_or_the_eigenvectors_sign():
    grid = (6, 6)
    features = clustered_features(4, grid, seed=3)
    together, _ = normalized_cut(features, grid)
    alone = torch.cat([normalized_cut(f[None], grid)[0] for f in features])
    assert torch.equal(together, alone)
    flipped, _ = normalized_cut(-features.flip(1).flip(1), grid)  # a sign change of every feature
    assert torch.equal(flipped, together)


def test_seed_component_equals_scipy_label():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 9, 11, generator=g) > 0.45
    flat = masks.flatten(1)
    seed = torch.stack([torch.nonzero(m)[0, 0] if m.any() else torch.tensor(0) for m in flat])
    got = seed_component(masks, seed)
    for mask, s, component in zip(masks, seed, got, strict=True):
        labels, _ = ndimage.label(mask.numpy())  # 4-connectivity, TokenCut's default
        label = labels.flat[int(s)]
        expected = (labels == label) if label else np.zeros_like(labels, dtype=bool)
        np.testing.assert_array_equal(component.numpy(), expected)


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_planted_keys_give_the_object(reg_tokens):
    model = planted_vit(reg_tokens)
    image = object_image([(2, 5, 3, 6)])  # a 3 x 3-cell red square on blue
    mask = TokenCut(model)([image])[0]
    expected = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    cell = SIZE // GRID
    expected[2 * cell : 5 * cell, 3 * cell : 6 * cell] = True
    assert torch.equal(mask, expected)


def test_only_the_seeds_component_is_kept_and_masks_follow_each_images_size():
    model = planted_vit()
    two = object_image([(1, 3, 1, 3), (5, 7, 5, 7)])  # two separate 2 x 2 red squares
    masks, _ = TokenCut(model).patch_masks([two])
    assert masks[0].sum() == 4  # one of the two squares
    labels, count = ndimage.label(masks[0].numpy())
    assert count == 1
    big = torch.nn.functional.interpolate(two[None].float(), (48, 40), mode="nearest")[0]
    out = TokenCut(model)([two, big.to(torch.uint8)])
    assert [tuple(m.shape) for m in out] == [(SIZE, SIZE), (48, 40)]


def test_features_option_reads_the_chosen_kernel_input():
    model = planted_vit()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[8:12] = torch.eye(4)  # v = k: the same answer
    image = object_image([(2, 5, 3, 6)])
    assert torch.equal(TokenCut(model, features="v")([image])[0], TokenCut(model)([image])[0])
    # q is all zeros: no similarity above tau anywhere, so the graph has no structure
    assert not torch.equal(TokenCut(model, features="q")([image])[0], TokenCut(model)([image])[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"features": "x"}, "Expected features one of"),
        ({"tau": 2.0}, "Expected tau"),
        ({"eps": 0.0}, "Expected eps > 0"),
        ({"img_size": 64}, "Expected img_size \\(32, 32\\)"),
        ({"img_size": (32,)}, "Expected img_size to be S or \\(H, W\\)"),
        ({"block": 1}, "Expected block to index the model's 1 blocks"),
        ({"refine": "yes"}, "Expected refine to be a bool or a dict"),
        ({"model": torch.nn.Linear(2, 2)}, "Expected model to be a timm ViT"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    options = {"model": planted_vit(), **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        TokenCut(**options)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="Expected features of shape"):
        normalized_cut(torch.zeros(4, 3), (2, 2))
    with pytest.raises(ValueError, match="grid\\[0\\] \\* grid\\[1\\] = 9 tokens"):
        normalized_cut(torch.zeros(1, 8, 3), (3, 3))
    with pytest.raises(ValueError, match="Expected x of shape"):
        TokenCut(planted_vit()).cut(torch.zeros(1, 3, 16, 16))


def test_the_default_model_is_timms_dino_vit_s16_with_pretrained_weights(monkeypatch):
    import relreg.masks.tokencut as tokencut

    calls = []

    def record(name, **kwargs):
        calls.append((name, kwargs))
        return planted_vit()

    monkeypatch.setattr(tokencut, "build_model", record)
    TokenCut()
    assert calls == [
        ("vit_small_patch16_224.dino", {"pretrained": True, "checkpoint": None, "num_classes": 0})
    ]


FAMILY_NAMES = ["vit", "dinov2 + registers", "EVA-02", "DINOv3 (rotary)", "BEiT", "SigLIP (map)"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tokencut_runs_on_the_vit_families(family):
    from tests.explain.families import build_family

    model = build_family(family)
    images = [
        torch.randint(
            0, 256, (3, 40, 30), generator=torch.Generator().manual_seed(i), dtype=torch.uint8
        )
        for i in range(3)
    ]
    segment = TokenCut(model)
    masks = segment(images)
    assert [tuple(m.shape) for m in masks] == [(40, 30)] * 3
    assert all(m.any() for m in masks)  # the seed's component is never empty
    again = segment(images)
    assert all(torch.equal(a, b) for a, b in zip(masks, again, strict=True))


def test_a_non_square_model_gets_a_non_square_grid():
    model = planted_vit()
    import timm

    wide = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=(16, 24),
        patch_size=4,
        embed_dim=8,
        depth=1,
        num_heads=1,
    )
    masks, vectors = TokenCut(wide.eval()).patch_masks([torch.zeros(3, 20, 30, dtype=torch.uint8)])
    assert masks.shape == (1, 4, 6) and vectors.shape == (1, 4, 6)
    assert TokenCut(model).img_size == (SIZE, SIZE)
