"""Image folders with masks, OOD folders and the SpuriousShapes benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from relreg.data import (
    MaskedImageFolder,
    OODImageFolder,
    RelRegDataModule,
    SpuriousShapes,
    class_index,
    write_shapes_folder,
)
from relreg.data.files import load_mask
from relreg.metrics import restrict_logits


def _write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


@pytest.fixture
def folder(tmp_path):
    """Two classes; a 0/255 mask, a 0/1 mask, one image without mask; rectangular 20x30 images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for cls, names in {"cat": ["a", "b", "c"], "dog": ["d", "e"]}.items():
        for n in names:
            _write(
                root / "images" / cls / f"{n}.png",
                rng.integers(0, 255, (20, 30, 3), dtype=np.uint8),
            )
    m = np.zeros((20, 30), np.uint8)
    m[5:15, 10:25] = 255
    _write(root / "masks" / "cat" / "a.png", m)
    _write(root / "masks" / "cat" / "b.png", (m > 0).astype(np.uint8))
    _write(root / "masks" / "dog" / "d.png", m)
    return root


def test_samples_sorted_and_masks_flagged(folder):
    ds = MaskedImageFolder(folder, train=False, img_size=16)
    assert [(p.parent.name, p.stem) for p, _, _ in ds.samples] == [
        ("cat", "a"),
        ("cat", "b"),
        ("cat", "c"),
        ("dog", "d"),
        ("dog", "e"),
    ]
    assert ds.class_to_idx == {"cat": 0, "dog": 1}
    assert ds.num_without_mask == 2
    s = ds[2]
    assert s["has_mask"].item() is False and s["mask"].sum() == 0
    s = ds[0]
    assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.float32
    assert set(s["mask"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(ds[0]["mask"], ds[1]["mask"])  # 0/255 and 0/1 masks decode alike


def test_joint_transform_keeps_mask_aligned(folder):
    # A mask that equals the image's red channel must still match it after crop, flip and resize.
    red = np.zeros((40, 40, 3), np.uint8)
    red[8:30, 4:20, 0] = 255
    _write(folder / "images" / "cat" / "r.png", red)
    _write(folder / "masks" / "cat" / "r.png", red[..., 0])
    ds = MaskedImageFolder(folder, train=True, img_size=24, mean=(0, 0, 0), std=(1, 1, 1))
    idx = [p.stem for p, _, _ in ds.samples].index("r")
    torch.manual_seed(0)
    for _ in range(5):
        s = ds[idx]
        # the image is resized bilinearly and the mask by nearest neighbour: edges may differ by a
        # pixel
        mismatch = ((s["image"][0] > 0.5).float() != s["mask"]).float().mean().item()
        assert mismatch < 0.08 and s["mask"].sum() > 0


def test_masks_resized_with_nearest_stay_binary(folder):
    ds = MaskedImageFolder(folder, train=True, img_size=13)
    assert set(ds[0]["mask"].unique().tolist()) <= {0.0, 1.0}


def test_per_class_limit_is_seeded_and_sorted(folder):
    a = MaskedImageFolder(folder, per_class=2, seed=3)
    b = MaskedImageFolder(folder, per_class=2, seed=3)
    assert [s[0] for s in a.samples] == [s[0] for s in b.samples]
    assert len(a) == 4
    assert [s[0] for s in a.samples] == sorted(s[0] for s in a.samples)
    picks = {
        tuple(p.stem for p, _, _ in MaskedImageFolder(folder, per_class=1, seed=k).samples)
        for k in range(8)
    }
    assert len(picks) > 1


def test_masked_only(folder):
    ds = MaskedImageFolder(folder, masked_only=True)
    assert len(ds) == 3 and ds.num_without_mask == 0


def test_label_space_follows_the_model(folder):
    ds = MaskedImageFolder(folder, classes=["fish", "dog", "bird", "cat"])
    assert ds.class_to_idx == {"cat": 3, "dog": 1}
    with pytest.raises(ValueError, match="unknown folders"):
        MaskedImageFolder(folder, classes=["cat"])
    assert class_index(["b", "a"], {"a": 7, "b": 2}) == {"a": 7, "b": 2}


def test_imagenet_s_decoding(tmp_path):
    ids = np.array([[0, 5, 300], [1000, 919, 0]])
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
    _write(tmp_path / "m.png", rgb)
    assert load_mask(tmp_path / "m.png", "imagenet_s").tolist() == [[0, 1, 1], [0, 1, 0]]


def test_bad_masks_and_folders(folder, tmp_path):
    _write(folder / "masks" / "dog" / "e.png", np.full((20, 30), 7, np.uint8))
    with pytest.raises(ValueError, match=r"mask values in \{0, 1\} or \{0, 255\}.*e.png"):
        MaskedImageFolder(folder)[4]
    _write(folder / "masks" / "dog" / "e.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(
        ValueError, match=r"e.png.*of its image's size \(20, 30\), but got \(10, 10\)"
    ):
        MaskedImageFolder(folder)[4]
    with pytest.raises(FileNotFoundError, match="images folder"):
        MaskedImageFolder(tmp_path / "nowhere")
    (folder / "images" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        MaskedImageFolder(folder)
    with pytest.raises(ValueError, match="mask_format"):
        MaskedImageFolder(folder, mask_format="coco")


def test_orphan_mask_warns(folder):
    _write(folder / "masks" / "dog" / "zzz.png", np.zeros((20, 30), np.uint8))
    with pytest.warns(UserWarning, match="1 masks .* have no image"):
        MaskedImageFolder(folder)


def test_grey_and_rgba_images_become_rgb(folder):
    _write(folder / "images" / "cat" / "g.png", np.zeros((20, 30), np.uint8), "L")
    _write(folder / "images" / "cat" / "h.png", np.zeros((20, 30, 4), np.uint8), "RGBA")
    ds = MaskedImageFolder(folder, img_size=8)
    for stem in ("g", "h"):
        assert ds[[p.stem for p, _, _ in ds.samples].index(stem)]["image"].shape == (3, 8, 8)


def test_ood_folder_and_scoring(folder):
    ood = OODImageFolder(
        folder / "images", classes=["fish", "dog", "bird", "cat"], img_size=8, scoring="restricted"
    )
    assert torch.equal(ood.split_classes, torch.tensor([1, 3]))
    assert ood[0]["label"].item() == 3 and ood[0]["has_mask"].item() is False
    logits = torch.tensor([[9.0, 1.0, 5.0, 2.0]])
    assert restrict_logits(logits, ood.split_classes).argmax(1).item() == 3
    with pytest.raises(ValueError, match="scoring"):
        OODImageFolder(folder / "images", scoring="top5")


def test_spurious_splits_and_cache(tmp_path):
    tr = SpuriousShapes("train", n=40, seed=2)
    ood = SpuriousShapes("ood", n=40, seed=2)
    assert not torch.equal(tr.images, ood.images)
    cached = SpuriousShapes("train", n=40, seed=2, cache_dir=tmp_path)
    by_stem = {p.stem: i for i, (p, _, _) in enumerate(cached.folder.samples)}
    for i in (0, 7, 33):
        j = by_stem[f"{i:05d}"]
        torch.testing.assert_close(
            cached[j]["image"], tr.images[i], atol=1 / 255 * 2 + 1e-6, rtol=0
        )
        assert torch.equal(cached[j]["label"], tr[i]["label"])
    assert (
        SpuriousShapes("train", n=40, seed=2, cache_dir=tmp_path).folder.root == cached.folder.root
    )
    with pytest.raises(ValueError, match="split one of"):
        SpuriousShapes("holdout")


def test_write_shapes_folder_refuses_a_different_folder(tmp_path):
    write_shapes_folder(tmp_path / "s", n=8)
    assert write_shapes_folder(tmp_path / "s", n=8) == tmp_path / "s"
    with pytest.raises(FileExistsError, match="absent or a shapes folder"):
        write_shapes_folder(tmp_path / "s", n=9)


def test_masked_fraction_mixes_batches():
    ds = SpuriousShapes("train", n=200, masked_fraction=0.5)
    has = torch.stack([ds[i]["has_mask"] for i in range(200)])
    assert 60 < has.sum() < 140
    assert all(ds[i]["mask"].sum() == 0 for i in range(200) if not has[i])


def test_datamodule_loaders_and_contract():
    dm = RelRegDataModule(
        SpuriousShapes("train", n=20),
        SpuriousShapes("val", n=10),
        ood={"ood": SpuriousShapes("ood", n=6)},
        batch_size=4,
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["has_mask"].dtype == torch.bool
    assert [len(dl.dataset) for dl in dm.val_dataloader()] == [10, 6]
    assert [split.name for split in dm.eval_splits()] == ["id", "ood"]
    with pytest.raises(ValueError, match="keys"):
        RelRegDataModule([{"image": torch.zeros(3, 4, 4)}])
    with pytest.raises(ValueError, match="batch_size"):
        RelRegDataModule(batch_size=0)


def test_transform_override_is_used(folder):
    t = v2.Compose([v2.Resize((6, 6)), v2.ToDtype(torch.float32, scale=True)])
    assert MaskedImageFolder(folder, transform=t)[0]["image"].shape == (3, 6, 6)


def test_class_file(folder, tmp_path):
    (tmp_path / "wnids.txt").write_text("fish\ndog\ncat\n")
    assert MaskedImageFolder(folder, classes=tmp_path / "wnids.txt").class_to_idx == {
        "cat": 2,
        "dog": 1,
    }
    with pytest.raises(FileNotFoundError, match="class file"):
        MaskedImageFolder(folder, classes=str(tmp_path / "none.txt"))


def test_spurious_marker_cue_through_the_cache(tmp_path):
    plain = SpuriousShapes("ood", n=12, seed=1, cue="marker")
    cached = SpuriousShapes("ood", n=12, seed=1, cue="marker", cache_dir=tmp_path)
    assert cached.folder.root.name.endswith("-marker")
    tint = SpuriousShapes("ood", n=12, seed=1, cache_dir=tmp_path)
    assert tint.folder.root != cached.folder.root
    marker_images = torch.stack([cached[i]["image"] for i in range(len(cached))])
    tint_images = torch.stack([tint[i]["image"] for i in range(len(tint))])
    assert not torch.allclose(marker_images, tint_images, atol=0.1)
    by_stem = {p.stem: i for i, (p, _, _) in enumerate(cached.folder.samples)}
    for i in (0, 5, 11):
        j = by_stem[f"{i:05d}"]
        torch.testing.assert_close(cached[j]["image"], plain.images[i], atol=2 / 255 + 1e-6, rtol=0)
    with pytest.raises(FileExistsError, match="absent or a shapes folder"):
        write_shapes_folder(cached.folder.root, "ood", 12, 32, 4, 0.95, 1, "tint")


def test_shuffled_labels_permute_with_a_seed():
    from relreg.data import ShuffledLabels

    base = SpuriousShapes("train", n=12)
    shuffled = ShuffledLabels(base, seed=3)
    labels = [int(base[i]["label"]) for i in range(12)]
    got = [int(shuffled[i]["label"]) for i in range(12)]
    assert got == [labels[int(j)] for j in shuffled.perm] and sorted(got) == sorted(labels)
    assert got != labels
    assert torch.equal(shuffled[5]["image"], base[5]["image"])
    assert torch.equal(ShuffledLabels(base, seed=3).perm, shuffled.perm)


def test_restricted_scoring_is_read_through_a_subset(folder):
    from torch.utils.data import Subset

    from relreg.metrics import scoring_classes

    ood = OODImageFolder(folder / "images", scoring="restricted", classes=["x", "cat", "dog"])
    assert scoring_classes(Subset(ood, [0, 1])).tolist() == [1, 2]


def test_split_folder_writer_is_all_or_nothing(tmp_path):
    from relreg.data.spurious import write_split_folder

    def broken():
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError, match="generator failed"):
        write_split_folder(tmp_path / "x", {"n": 1}, broken, ["a"], what="test")
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary left behind

    def one_image():
        return torch.ones(1, 3, 4, 4), torch.ones(1, 4, 4), torch.tensor([0]), {"cues": [2]}

    root = write_split_folder(tmp_path / "x", {"n": 1}, one_image, ["a"], what="test")
    assert json.loads((root / "items.json").read_text()) == {"cues": [2]}
    before = sorted(p.name for p in root.rglob("*"))
    with pytest.raises(FileExistsError, match="absent or a test folder made with"):
        write_split_folder(root, {"n": 2}, broken, ["a"], what="test")  # generate is never called
    assert sorted(p.name for p in root.rglob("*")) == before
    assert write_split_folder(root, {"n": 1}, broken, ["a"], what="test") == root  # the cache
