"""SpuriousScenes: deterministic, masks are the pasted digits' strokes, the cue is controllable,
train and test digits are disjoint, bad arguments are refused, scikit-image is imported lazily."""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

import relreg  # noqa: E402
from relreg.data import SpuriousScenes, make_scenes  # noqa: E402
from relreg.data.scene_sources import BACKGROUNDS, DIGIT_SPLIT  # noqa: E402
from relreg.data.scenes import STROKE_THRESHOLD  # noqa: E402


def _within_binomial(k: int, n: int, p: float) -> bool:
    return abs(k / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_deterministic_and_seed_dependent():
    a = make_scenes(8, size=16, seed=3)
    b = make_scenes(8, size=16, seed=3)
    for key in ("images", "masks", "labels", "cues", "digits", "boxes"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert not torch.equal(a.images, make_scenes(8, size=16, seed=4).images)
    x = SpuriousScenes("train", n=6, size=16, seed=1)
    y = SpuriousScenes("train", n=6, size=16, seed=1)
    assert all(torch.equal(x[i]["image"], y[i]["image"]) for i in range(6))
    z = SpuriousScenes("train", n=6, size=16, seed=2)
    assert not torch.equal(torch.stack([x[i]["image"] for i in range(6)]), z.images)


def test_masks_are_the_pasted_strokes():
    from sklearn.datasets import load_digits

    digits = load_digits()
    batch = make_scenes(24, size=32, num_classes=10, seed=5, spurious=0.5)
    assert batch.images.shape == (24, 3, 32, 32) and batch.masks.shape == (24, 32, 32)
    assert set(batch.masks.unique().tolist()) <= {0.0, 1.0}
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    # the digit's class is the label, and the mask is its upsampled intensity, thresholded, pasted
    assert torch.equal(torch.from_numpy(digits.target)[batch.digits], batch.labels)
    for i in range(24):
        top, left, side = batch.boxes[i].tolist()
        source = torch.from_numpy(digits.images[int(batch.digits[i])]).float()[None, None] / 16
        up = F.interpolate(source, size=(side, side), mode="bilinear")[0, 0]
        expected = torch.zeros(32, 32)
        expected[top : top + side, left : left + side] = (up > STROKE_THRESHOLD).float()
        assert torch.equal(batch.masks[i], expected), i
    # the mask is exactly where the digit changed the picture: a bright stroke on a dimmed photo
    low = batch.images.min(1).values
    high = batch.images.max(1).values
    assert low[batch.masks == 1].min() >= 0.75 - 1e-6
    assert high[batch.masks == 0].max() <= 0.6 + 1e-6
    frac = batch.masks.flatten(1).mean(1)
    assert torch.all(frac > 0.03) and torch.all(frac < 0.5)


@pytest.mark.parametrize(
    "split, spurious, expected",
    [("train", 0.8, 0.8), ("test", 0.95, 0.95), ("unbiased", 0.95, 0.25), ("ood", 0.95, 0.0)],
)
def test_cue_agreement(split, spurious, expected):
    ds = SpuriousScenes(split, n=400, size=16, num_classes=4, spurious=spurious, seed=7)
    agree = int((ds.cues == ds.labels).sum())
    assert _within_binomial(agree, len(ds), expected), (agree, expected)
    assert ds.backgrounds == list(BACKGROUNDS[:4]) and ds.classes == ["zero", "one", "two", "three"]
    assert torch.equal(ds.labels, torch.arange(400) % 4)
    if split == "unbiased":  # uniform over the sources for every label
        for c in range(4):
            counts = torch.bincount(ds.cues[ds.labels == c], minlength=4)
            assert all(_within_binomial(int(k), 100, 0.25) for k in counts), counts


def test_ood_cue_always_names_a_wrong_class_chosen_uniformly():
    ds = SpuriousScenes("ood", n=600, size=16, num_classes=3, seed=2)
    assert torch.all(ds.cues != ds.labels) and ds.cues.max() < 3
    for c in range(3):
        counts = torch.bincount(ds.cues[ds.labels == c], minlength=3)
        assert counts[c] == 0
        assert all(_within_binomial(int(counts[o]), 200, 0.5) for o in range(3) if o != c)


def test_distractors_only_in_unbiased():
    ds = SpuriousScenes("unbiased", n=300, size=16, num_classes=2, distractors=4, seed=1)
    assert ds.backgrounds == list(BACKGROUNDS[:6])
    counts = torch.bincount(ds.cues, minlength=6)
    assert len(counts) == 6 and all(_within_binomial(int(k), 300, 1 / 6) for k in counts)
    with pytest.raises(ValueError, match="distractors=0 for split 'train'"):
        SpuriousScenes("train", n=4, size=16, distractors=1)


def test_background_follows_the_cue():
    """Grey sources (grass, brick) give grey crops up to the colour jitter; colour ones do not."""
    batch = make_scenes(200, size=16, num_classes=4, seed=3, spurious=0.25)
    low = batch.images.min(1).values  # (N, H, W)
    high = batch.images.max(1).values
    # background pixels away from the clamps: the largest channel ratio of each image
    usable = (batch.masks == 0) & (low > 0.05) & (high < 0.59)
    spread = torch.where(usable, high / low.clamp(min=0.05), 1.0).flatten(1).max(1).values
    grey = (batch.cues == BACKGROUNDS.index("grass")) | (batch.cues == BACKGROUNDS.index("brick"))
    assert torch.all(spread[grey] <= 1.1 / 0.9 + 1e-3)  # the per-channel gains only
    assert (spread[~grey] > 1.3).float().mean() > 0.9


def test_train_and_test_digits_are_disjoint():
    train = SpuriousScenes("train", n=200, size=16, num_classes=10)
    unbiased = SpuriousScenes("unbiased", n=200, size=16, num_classes=10)
    evals = [SpuriousScenes(s, n=200, size=16, num_classes=10) for s in ("val", "test", "ood")]
    seen = set(train.digits.tolist()) | set(unbiased.digits.tolist())
    held_out = set().union(*(set(ds.digits.tolist()) for ds in evals))
    assert max(seen) < DIGIT_SPLIT <= min(held_out) and not seen & held_out
    forced = SpuriousScenes("unbiased", n=20, size=16, digits="test")
    assert int(forced.digits.min()) >= DIGIT_SPLIT


def test_samples_masks_and_normalisation():
    ds = SpuriousScenes("val", n=10, size=16, masked_fraction=0.5, mean=0.5, std=0.25)
    sample = ds[0]
    assert sorted(sample) == ["group", "has_mask", "image", "label", "mask"]
    # group: label x the background the cue points to (4 digits x 4 backgrounds)
    assert ds.num_groups == 16 and sample["group"] == sample["label"] * 4 + ds.cues[0]
    assert sample["image"].shape == (3, 16, 16) and sample["mask"].shape == (16, 16)
    assert sample["image"].min() >= -2 - 1e-6 and sample["image"].max() <= 2 + 1e-6
    assert 0 < int(ds.has_mask.sum()) < 10
    for i in range(10):
        assert bool(ds[i]["mask"].any()) == bool(ds.has_mask[i])


def test_cache_dir_round_trip(tmp_path):
    kw = dict(n=8, size=16, num_classes=4, seed=3)
    memory = SpuriousScenes("ood", **kw)
    cached = SpuriousScenes("ood", cache_dir=tmp_path, **kw)
    again = SpuriousScenes("ood", cache_dir=tmp_path, **kw)  # reuses the folder
    assert len(list(tmp_path.iterdir())) == 1 and len(cached) == 8
    order = [int(p.stem) for p, _, _ in cached.folder.samples]
    assert torch.equal(cached.labels, memory.labels[order])
    assert torch.equal(cached.cues, memory.cues[order]) and torch.equal(again.cues, cached.cues)
    assert torch.equal(cached.digits, memory.digits[order])
    for j, i in enumerate(order):
        assert torch.equal(cached[j]["mask"].float(), memory[i]["mask"])
        assert (cached[j]["image"] - memory[i]["image"]).abs().max() <= 2 / 255 / 0.5 + 1e-6


def test_load_split_scenes_spec():
    import timm

    from relreg.data import load_split

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=5,
        img_size=16,
        patch_size=8,
        embed_dim=24,
        depth=1,
        num_heads=2,
    )
    ds = load_split("scenes:ood:6", model)
    assert isinstance(ds, SpuriousScenes) and len(ds) == 6 and ds[0]["image"].shape == (3, 16, 16)
    assert len(ds.classes) == 5 and torch.all(ds.cues != ds.labels)
    with pytest.raises(ValueError, match="scenes:SPLIT"):
        load_split("scenes:nope", model)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n": 0}, ValueError, "n an int >= 1, but got 0"),
        ({"size": 8}, ValueError, "size an int >= 16, but got 8"),
        ({"num_classes": 11}, ValueError, r"num_classes an int in \[2, 10\], but got 11"),
        ({"num_classes": 1}, ValueError, "num_classes"),
        ({"spurious": 1.5}, ValueError, r"spurious in \[0.0, 1.0\], but got 1.5"),
        ({"spurious": "high"}, TypeError, "spurious a number"),
        ({"digit_size": 0.1}, ValueError, "digit_size in"),
        ({"split": "nope"}, ValueError, "split one of"),
        ({"digits": "all"}, ValueError, "digits one of"),
        ({"split": "unbiased", "num_classes": 10, "distractors": 2}, ValueError, "distractors in"),
        ({"split": "unbiased", "distractors": 1.5}, TypeError, "distractors an int"),
        ({"masked_fraction": 2}, ValueError, "masked_fraction in"),
        ({"std": 0}, ValueError, "std a number"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SpuriousScenes(**{"n": 4, "size": 16, **kwargs})


def test_import_is_lazy_and_names_the_extra(monkeypatch):
    """No relreg module imports scikit-image or scikit-learn at import time (``import relreg``
    works without the extra); a missing one is an ImportError that names ``relreg[scenes]``."""
    from relreg.data import scene_sources

    for path in Path(relreg.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in getattr(node, "names", [])] + [getattr(node, "module", "")]
            if isinstance(node, ast.Import | ast.ImportFrom):
                assert not any(str(n).split(".")[0] in ("skimage", "sklearn") for n in names), path
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match=r"relreg\[scenes\].*skimage\.data"):
        scene_sources._import("skimage.data")
