"""Generated shapes: deterministic, masks match the pixels drawn, the shortcut is controllable."""

from __future__ import annotations

import pytest
import torch

from relreg.data import SHAPES, make_shapes
from relreg.data.synthetic import _TINTS


def test_deterministic_and_seed_dependent():
    a = make_shapes(8, seed=3)
    b = make_shapes(8, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, make_shapes(8, seed=4).images)


def test_shapes_masks_and_labels():
    batch = make_shapes(12, size=24, num_classes=6)
    assert batch.images.shape == (12, 3, 24, 24) and batch.masks.shape == (12, 24, 24)
    assert set(batch.masks.unique().tolist()) <= {0.0, 1.0}
    assert batch.labels.tolist() == [i % 6 for i in range(12)]
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    frac = batch.masks.flatten(1).mean(1)
    assert torch.all(frac > 0.02) and torch.all(frac < 0.6)


def test_mask_marks_the_bright_shape():
    batch = make_shapes(16, size=32)
    brightness = batch.images.min(dim=1).values  # shape pixels have every channel >= 0.7
    on = brightness[batch.masks == 1]
    off = brightness[batch.masks == 0]
    assert on.min() >= 0.7 - 1e-6 and off.max() <= 0.6 + 1e-6


@pytest.mark.parametrize("spurious, expected", [(1.0, 1.0), (0.0, None)])
def test_background_tint_follows_spurious(spurious, expected):
    batch = make_shapes(64, size=16, num_classes=4, seed=1, spurious=spurious)
    bg = (batch.images * (1 - batch.masks[:, None])).sum((2, 3)) / (1 - batch.masks).sum((1, 2))[
        :, None
    ]
    nearest = torch.cdist(bg, 0.6 * (0.5 * _TINTS[:4] + 0.25)).argmin(1)
    agree = (nearest == batch.labels).float().mean().item()
    assert torch.equal(nearest, batch.cues)
    if expected is not None:
        assert agree == expected
    else:
        assert agree < 0.6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n an int"),
        ({"n": 2, "size": 4}, "size an int"),
        ({"n": 2, "num_classes": len(SHAPES) + 1}, "num_classes"),
        ({"n": 2, "spurious": 2.0}, "spurious"),
        ({"n": 2, "cue": "corner"}, "cue one of"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_shapes(**kwargs)


def _marker_corner(images: torch.Tensor, size: int) -> torch.Tensor:
    """Which corner (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) is all white."""
    w = size // 8
    corners = [images[:, :, r : r + w, c : c + w] for r in (0, size - w) for c in (0, size - w)]
    white = torch.stack([(c == 1.0).flatten(1).all(1) for c in corners], dim=1)
    assert torch.all(white.sum(1) == 1), "exactly one marker per image"
    return white.float().argmax(1)


@pytest.mark.parametrize("spurious", [1.0, 0.0])
def test_marker_cue_sits_in_the_class_corner_only_when_spurious(spurious):
    size = 32
    batch = make_shapes(48, size=size, num_classes=4, seed=2, spurious=spurious, cue="marker")
    corner = _marker_corner(batch.images, size)
    agree = (corner == batch.labels).float().mean().item()
    assert agree == spurious
    assert torch.equal(corner, batch.cues)  # cues: the class the marker points to
    # the shape keeps a marker width from every edge, so marker and object never touch
    w = size // 8
    ring = torch.ones(size, size, dtype=torch.bool)
    ring[w:-w, w:-w] = False
    assert batch.masks[:, ring].sum() == 0
    assert torch.all(batch.masks.flatten(1).sum(1) > 0)


def test_marker_cue_leaves_the_tint_uninformative():
    batch = make_shapes(400, size=16, num_classes=4, seed=3, spurious=1.0, cue="marker")
    bg = (batch.images * (1 - batch.masks[:, None])).sum((2, 3)) / (1 - batch.masks).sum((1, 2))[
        :, None
    ]
    nearest = torch.cdist(bg, 0.6 * (0.5 * _TINTS[:4] + 0.25)).argmin(1)
    assert (nearest == batch.labels).float().mean().item() < 0.4


def test_every_dataset_yields_the_sample_contract(tmp_path):
    from relreg.data import (
        MaskedImageFolder,
        OODImageFolder,
        Sample,
        SpuriousShapes,
        write_shapes_folder,
    )
    from relreg.data.datamodule import REQUIRED_KEYS

    assert REQUIRED_KEYS == ("image", "label", "mask", "has_mask")
    assert set(REQUIRED_KEYS) == Sample.__required_keys__
    root = write_shapes_folder(tmp_path / "shapes", "val", n=6)
    datasets = [SpuriousShapes("val", n=4), MaskedImageFolder(root, train=False, img_size=32)]
    datasets.append(OODImageFolder(root / "images", img_size=32))
    for ds in datasets:
        sample = ds[0]
        assert set(REQUIRED_KEYS) <= set(sample) <= set(Sample.__annotations__), type(ds).__name__
        assert sample["image"].ndim == 3 and sample["mask"].shape == sample["image"].shape[-2:]
