"""``make_masks`` / ``relreg masks``: the layout MaskedImageFolder reads, resume, per-class choice,
summary, atomic writes and refusals before any work; the made masks train through ``relreg fit``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from relreg.cli import main
from relreg.data import MaskedImageFolder
from relreg.masks import SUMMARY_FILE, TokenCut, bilateral_refine, make_masks, summarize
from tests.masks.planted import SIZE, object_image, planted_vit


def image_tree(root: Path, classes=("cat", "n01443537"), per_class: int = 4) -> Path:
    """Blue images with a red square, in class folders; one unreadable file in the first class."""
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            r = 1 + (i + k) % 4
            pixels = object_image([(r, r + 3, 2, 5)]).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    (root / classes[0] / "broken.png").write_bytes(b"not a png")
    return root


class Recorder:
    """A mask method that records its calls: the upper half of each image."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts):
        self.calls.append(list(prompts))
        out = []
        for im in images:
            mask = torch.zeros(im.shape[-2:], dtype=torch.bool)
            mask[: im.shape[1] // 2] = True
            out.append(mask)
        return out


def test_masks_land_in_the_layout_masked_image_folder_reads(tmp_path):
    images = image_tree(tmp_path / "raw")
    out = tmp_path / "made"
    summary = make_masks(images, out, TokenCut(planted_vit()), progress=False, batch_size=3)
    assert summary["masks_written"] == 8 and summary["masks_kept"] == 0
    assert summary["images_seen"] == 9 and summary["unreadable"] == [str(images / "cat/broken.png")]
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    ds = MaskedImageFolder(out, train=False, img_size=SIZE, preprocessing="robustvit")
    assert len(ds) == 8 and ds.num_without_mask == 0
    segment = TokenCut(planted_vit())
    for image_path, mask_path, _ in ds.samples:
        assert image_path.is_symlink() and image_path.resolve().parent.parent == images.resolve()
        mask = torch.from_numpy(np.asarray(Image.open(mask_path)) > 0)
        pixels = torch.from_numpy(np.array(Image.open(image_path))).permute(2, 0, 1)
        assert torch.equal(mask, segment([pixels])[0])
    # the planted squares are 3 x 3 of the 8 x 8 cells
    assert summary["mean_foreground_share"] == pytest.approx(9 / 64)
    assert summary["empty"] == 0 and summary["whole_image"] == 0


def test_a_second_run_resumes_and_overwrite_makes_them_again(tmp_path):
    images = image_tree(tmp_path / "raw")
    out = tmp_path / "made"
    first = Recorder()
    make_masks(images, out, first, progress=False, limit=3)
    assert sum(len(c) for c in first.calls) == 3
    stamp = {p: p.stat().st_mtime_ns for p in (out / "masks").rglob("*.png")}
    second = Recorder()
    summary = make_masks(images, out, second, progress=False)
    assert sum(len(c) for c in second.calls) == 5  # only the masks not written yet
    assert summary["masks_kept"] == 3 and summary["masks_written"] == 5
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    assert summary["mean_foreground_share"] == pytest.approx(0.5)
    third = Recorder()
    assert make_masks(images, out, third, progress=False, overwrite=True)["masks_written"] == 8
    assert not list(out.rglob(".*"))  # no temporary file is left behind


def test_per_class_chooses_the_images_masked_image_folder_would_choose(tmp_path):
    images = image_tree(tmp_path / "raw", per_class=6)
    (images / "cat" / "broken.png").unlink()
    out = tmp_path / "made"
    make_masks(images, out, Recorder(), progress=False, per_class=3, seed=5)
    made = sorted(
        p.relative_to(out / "masks").with_suffix("") for p in (out / "masks").rglob("*.png")
    )
    # the same seeded choice as a fit config's per_class on the original folder
    original = tmp_path / "orig"
    (original / "images").mkdir(parents=True)
    for d in images.iterdir():
        (original / "images" / d.name).symlink_to(d.resolve())
    ds = MaskedImageFolder(original, per_class=3, seed=5, img_size=SIZE)
    chosen = sorted(Path(p.parent.name) / p.stem for p, _, _ in ds.samples)
    assert made == chosen and len(made) == 6


def test_prompts_name_the_classes_with_timms_lemmas(tmp_path):
    images = image_tree(tmp_path / "raw", per_class=1)
    rec = Recorder()
    make_masks(images, tmp_path / "made", rec, progress=False, prompt="a photo of a {}.")
    assert rec.calls == [["a photo of a cat.", "a photo of a goldfish."]]


def test_bad_input_is_refused_before_any_file_is_written(tmp_path):
    images = image_tree(tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match="parent folder of out"):
        make_masks(images, tmp_path / "missing" / "out", Recorder(), progress=False)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError, match="Expected per_class"):
        make_masks(images, tmp_path / "out", Recorder(), per_class=0)
    with pytest.raises(ValueError, match="Expected prompt to be a template"):
        make_masks(images, tmp_path / "out", Recorder(), prompt="no slot")
    with pytest.raises(ValueError, match="Unknown mask method 'nope'"):
        make_masks(images, tmp_path / "out", "nope")
    with pytest.raises(FileNotFoundError, match="Expected images folder"):
        make_masks(tmp_path / "nothing", tmp_path / "out", Recorder())
    assert not (tmp_path / "out").exists()


def test_a_method_returning_the_wrong_size_is_named(tmp_path):
    images = image_tree(tmp_path / "raw", per_class=1)

    def small(images, prompts):
        return [torch.ones(2, 2, dtype=torch.bool) for _ in images]

    with pytest.raises(ValueError, match="at the image's size"):
        make_masks(images, tmp_path / "made", small, progress=False)


def test_summary_counts_empty_and_whole_masks():
    s = summarize([0.0, 0.005, 0.5, 0.995, 1.0], bins=4)
    assert (s["masks"], s["empty"], s["whole_image"]) == (5, 2, 2)
    assert s["histogram"]["counts"] == [2, 0, 1, 2]


def test_bilateral_refinement_follows_the_images_edges():
    image = object_image([(2, 5, 2, 5)])
    coarse = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    coarse[7:21, 7:21] = True  # the object (8..20) shifted by one pixel
    refined = bilateral_refine(image, coarse)
    truth = image[0] > 0
    iou = lambda a, b: ((a & b).sum() / (a | b).sum()).item()  # noqa: E731
    assert iou(refined, truth) > iou(coarse, truth)
    with pytest.raises(ValueError, match="Expected mask of the image's size"):
        bilateral_refine(image, coarse[:4])


def test_relreg_masks_command_and_the_made_folder_trains_through_fit(tmp_path, capsys, monkeypatch):
    images = image_tree(tmp_path / "raw", per_class=3)
    checkpoint = tmp_path / "planted.pth"
    torch.save(planted_vit().state_dict(), checkpoint)
    out = tmp_path / "made"
    # a timm name + a local weights file, as a user without network access passes them
    import relreg.masks.tokencut as tokencut

    original = tokencut.build_model
    monkeypatch.setattr(  # the planted architecture for the name
        tokencut,
        "build_model",
        lambda name, **kw: original(
            name, **kw, img_size=SIZE, patch_size=4, embed_dim=4, depth=1, num_heads=1
        ),
    )
    command = ["masks", "--images", str(images), "--out", str(out)]
    weights = ["--model", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint)]
    assert main([*command, *weights, "--per-class", "2"]) == 0
    printed = capsys.readouterr().out
    assert "4 masks written" in printed and "1 unreadable images skipped" in printed
    assert main([*command, "--method", "clipseg", "--refine"]) == 2
    assert "--refine only with --method tokencut" in capsys.readouterr().err

    config = tmp_path / "fit.yaml"
    config.write_text(
        f"""
trainer:
  default_root_dir: {tmp_path / "run"}
  max_steps: 2
  logger: false
  callbacks: []
  enable_checkpointing: false
  enable_progress_bar: false
model:
  model: vit_tiny_patch16_224
  num_classes: 2
  model_kwargs: {{img_size: 32, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}}
data:
  batch_size: 2
  train: {{class_path: relreg.data.MaskedImageFolder, init_args: {{root: {out}, img_size: 32}}}}
"""
    )
    assert main(["fit", "--config", str(config)]) in (0, None)
