"""A catalogue of bad inputs, in order: each gets a clear error that names the argument or file,
the expected and the received value (or, where allowed, a counted skip with a warning), and
leaves nothing half-changed. Test names carry the item number."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from relreg.cli import main
from relreg.data import MaskedImageFolder, OODImageFolder, write_shapes_folder
from relreg.explain import explain
from relreg.lightning import RelRegModule
from relreg.losses import relevance_mass_loss, robustvit_loss, rrr_loss
from relreg.metrics import PerturbationAUC, RelevanceMass, pointing_game, relevance_mass
from relreg.models import build_model, load_weights
from relreg.objective import Objective
from tests.conftest import model_state

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"
TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)
RAW = v2.ToDtype(torch.float32, scale=True)  # joint transform that keeps the pixels as they are


def tiny_vit(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY
    ).eval()


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def write_truncated_png(path: Path) -> Path:
    """A valid 32x32 PNG cut in half."""
    rng = np.random.default_rng(0)
    write_png(path, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A valid images/masks folder: 8 shapes of 32x32 pixels, every image with its mask."""
    return write_shapes_folder(tmp_path / "shapes", n=8, size=32)


def first_image(root: Path, kind: str = "images") -> Path:
    return sorted((root / kind).glob("*/*.png"))[0]


# ---------------------------------------------------------------- 1. folder with no images
def test_01_no_class_folders(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"Expected class folders in '.*images', but found none"):
        MaskedImageFolder(tmp_path / "data")
    write_png(tmp_path / "split" / "loose.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"found none; its 1 image files belong in class folders"):
        OODImageFolder(tmp_path / "split")


def test_01_class_folders_without_image_files(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "data" / "images" / name).mkdir(parents=True)
    (tmp_path / "data" / "images" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(
        ValueError,
        match=r"Expected image files \(\.jpg.*\) in the class folders of '.*images', but all 2 "
        r"are empty \(other files: \['notes.txt'\]\)",
    ):
        MaskedImageFolder(tmp_path / "data")
    with pytest.raises(ValueError, match="but all 2 are empty"):
        OODImageFolder(tmp_path / "data" / "images")


# ------------------------------------------------------------------- 2. an empty class folder
def test_02_empty_class_folder_next_to_full_ones(folder):
    (folder / "images" / "zebra").mkdir()
    with pytest.raises(
        ValueError, match=r"in every class folder of '.*images', but 1 of \d are empty: \['zebra'\]"
    ):
        MaskedImageFolder(folder)
    with pytest.raises(ValueError, match=r"are empty: \['zebra'\]"):
        OODImageFolder(folder / "images")


# ------------------------------------------------------ 3. mask without image, image without mask
def test_03_mask_without_image_warns_with_count(folder):
    write_png(folder / "masks" / "circle" / "orphan.png", np.zeros((32, 32), np.uint8))
    with pytest.warns(
        UserWarning, match=r"1 masks under '.*masks' have no image; they are ignored"
    ):
        ds = MaskedImageFolder(folder, transform=RAW)
    assert len(ds) == 8


def test_03_image_without_mask_is_flagged_and_counted(folder):
    lonely = first_image(folder, "masks")
    lonely.unlink()
    ds = MaskedImageFolder(folder, transform=RAW)
    assert len(ds) == 8 and ds.num_without_mask == 1
    index = [p.stem for p, _, _ in ds.samples].index(lonely.stem)
    sample = ds[index]
    assert sample["has_mask"].item() is False and sample["mask"].sum() == 0
    assert MaskedImageFolder(folder, masked_only=True).num_without_mask == 0


# ------------------------------------------------------------------------------- 4. bad masks
def test_04_mask_of_the_wrong_size(folder):
    mask = write_png(first_image(folder, "masks"), np.zeros((10, 12), np.uint8))
    ds = MaskedImageFolder(folder, transform=RAW)
    with pytest.raises(
        ValueError,
        match=rf"mask '.*{mask.name}' of its image's size \(32, 32\), but got \(10, 12\)",
    ):
        ds[0]


def test_04_mask_values_outside_0_1_and_0_255(folder):
    values = np.zeros((32, 32), np.uint8)
    values[:4] = 7
    mask = write_png(first_image(folder, "masks"), values)
    ds = MaskedImageFolder(folder, transform=RAW)
    with pytest.raises(
        ValueError,
        match=rf"mask values in \{{0, 1\}} or \{{0, 255\}} in '.*{mask.name}', but got \[0, 7\]",
    ):
        ds[0]


# ------------------------------------------------------------- 5. truncated and non-image files
@pytest.fixture
def corrupt_folder(folder: Path) -> tuple[Path, list[Path]]:
    """The shapes folder with a truncated PNG and a text file named .png among its images."""
    truncated = write_truncated_png(folder / "images" / "circle" / "truncated.png")
    fake = folder / "images" / "square" / "fake.png"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("this is not an image")
    return folder, [truncated, fake]


def test_05_unreadable_image_is_an_error_naming_the_file(corrupt_folder):
    root, bad = corrupt_folder
    ds = MaskedImageFolder(root, transform=RAW)
    assert len(ds) == 10 and ds.skipped == []
    paths = [p for p, _, _ in ds.samples]
    for path in bad:
        with pytest.raises(
            ValueError, match=rf"Could not read '.*{path.name}' as an image.*skip_corrupt=True"
        ):
            ds[paths.index(path)]


def test_05_skip_corrupt_drops_counts_and_warns_once(corrupt_folder):
    root, bad = corrupt_folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = MaskedImageFolder(root, transform=RAW, skip_corrupt=True)
    messages = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(messages) == 1
    assert "Skipped 2 unreadable files" in messages[0]
    assert "truncated.png" in messages[0] and "fake.png" in messages[0]
    assert sorted(ds.skipped) == sorted(bad) and len(ds) == 8
    assert all(ds[i]["image"].shape == (3, 32, 32) for i in range(len(ds)))


def test_05_skip_corrupt_checks_masks_and_ood_folders(corrupt_folder):
    root, bad = corrupt_folder
    mask = write_truncated_png(first_image(root, "masks"))
    with pytest.warns(UserWarning, match="Skipped 3 unreadable files"):
        ds = MaskedImageFolder(root, transform=RAW, skip_corrupt=True)
    assert mask in ds.skipped and len(ds) == 7
    with pytest.warns(UserWarning, match="Skipped 2 unreadable files"):
        ood = OODImageFolder(root / "images", img_size=32, skip_corrupt=True)
    assert sorted(ood.skipped) == sorted(bad) and len(ood) == 8


def test_05_skip_corrupt_refills_per_class(tmp_path):
    for i in range(4):
        write_png(tmp_path / "d" / "images" / "a" / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
    for i in range(2):
        write_truncated_png(tmp_path / "d" / "images" / "a" / f"bad{i}.png")
    with pytest.warns(UserWarning, match="unreadable"):
        ds = MaskedImageFolder(tmp_path / "d", per_class=4, skip_corrupt=True, seed=1)
    assert sorted(p.stem for p, _, _ in ds.samples) == ["0", "1", "2", "3"]


def test_05_skip_corrupt_is_a_config_option(capsys):
    paper = ROOT / "configs" / "paper"
    args = ["fit", "--config", str(paper / "base.yaml"), "--config", str(paper / "vit_b16.yaml")]
    flags = ["--data.train.init_args.skip_corrupt", "true"]
    flags += ["--data.ood.imagenet_r.init_args.skip_corrupt", "true"]
    with pytest.raises(SystemExit) as info:
        main([*args, *flags, "--print_config"])
    assert info.value.code == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["train"]["init_args"]["skip_corrupt"] is True
    assert data["ood"]["imagenet_r"]["init_args"]["skip_corrupt"] is True


# ----------------------------------------------------------------------- 6. grey and RGBA images
def test_06_grey_and_rgba_images_load_as_rgb(tmp_path):
    grey = np.full((6, 8), 100, np.uint8)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)  # fully transparent: alpha must be dropped, not composited
    write_png(tmp_path / "d" / "images" / "a" / "grey.png", grey, "L")
    write_png(tmp_path / "d" / "images" / "a" / "rgba.png", rgba, "RGBA")
    ds = MaskedImageFolder(tmp_path / "d", transform=RAW)
    grey_rgb = ds[0]["image"]
    rgba_rgb = ds[1]["image"]
    assert grey_rgb.shape == rgba_rgb.shape == (3, 6, 8)
    torch.testing.assert_close(grey_rgb, torch.full((3, 6, 8), 100 / 255))
    expected = torch.tensor([10, 200, 30], dtype=torch.float32).view(3, 1, 1) / 255
    torch.testing.assert_close(rgba_rgb, expected.expand(3, 6, 8))


# ------------------------------------------------------- 7. NaN / Inf and targets out of range
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_07_non_finite_images(bad):
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 3, 3] = bad
    before = model_state(model)
    with pytest.raises(ValueError, match=r"Expected finite images, but got \d NaN and \d Inf"):
        explain(model, x, "chefer")
    assert model_state(model) == before


LOSSES = [robustvit_loss, relevance_mass_loss, rrr_loss]
METRICS = [relevance_mass, pointing_game, lambda m, s: RelevanceMass()(m, s)]


@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_07_non_finite_relevance_in_losses(fn, bad):
    relevance = torch.rand(2, 8, 8)
    masks = (torch.rand(2, 8, 8) > 0.5).float()
    relevance[0, 1, 1] = bad
    with pytest.raises(ValueError, match="Expected finite relevance, but got NaN or Inf"):
        fn(relevance, masks)
    masks[1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"Expected mask values in \[0, 1\]"):
        fn(torch.rand(2, 8, 8), masks)


@pytest.mark.parametrize("fn", METRICS, ids=["relevance_mass", "pointing_game", "RelevanceMass"])
def test_07_non_finite_relevance_in_metrics(fn):
    maps = torch.rand(2, 4, 4)
    masks = (torch.rand(2, 32, 32) > 0.5).float()
    maps[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="Expected finite maps, but got NaN or Inf"):
        fn(maps, masks)


def test_07_non_finite_relevance_in_faithfulness_metrics():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    maps = torch.rand(2, 4, 4)
    maps[1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="Expected finite maps, but got NaN or Inf"):
        PerturbationAUC(model).update(x, maps)


@pytest.mark.parametrize("target", [7, -1])
def test_07_target_out_of_range(target):
    model = tiny_vit(num_classes=4)
    before = model_state(model)
    with pytest.raises(
        ValueError,
        match=rf"Expected target classes in \[0, 3\] \(the model has 4 classes\), "
        rf"but got \[{target}\]",
    ):
        explain(model, torch.randn(2, 3, 32, 32), "chefer", target=target)
    assert model_state(model) == before


# ------------------------------------------------------------------- 8. checkpoints that don't fit
@pytest.fixture
def foreign_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """A 10-class ViT checkpoint and a ResNet checkpoint, with what their error names."""
    vit10 = tmp_path / "vit10.pt"
    resnet = tmp_path / "resnet.pt"
    torch.save(tiny_vit(num_classes=10).state_dict(), vit10)
    torch.save(timm.create_model("resnet18", num_classes=4).state_dict(), resnet)
    return {
        "num_classes": (vit10, r"head.weight: checkpoint \(10, 24\), model \(4, 24\)"),
        "architecture": (resnet, r"keys missing from the checkpoint.*unexpected keys.*bn1"),
    }


@pytest.mark.parametrize("kind", ["num_classes", "architecture"])
def test_08_checkpoint_that_does_not_fit(foreign_checkpoints, kind):
    path, detail = foreign_checkpoints[kind]
    match = rf"(?s)Checkpoint '.*{path.name}' does not fit VisionTransformer.*{detail}"
    with pytest.raises(ValueError, match=match):
        build_model("vit_tiny_patch16_224", checkpoint=path, num_classes=4, **TINY)
    with pytest.raises(ValueError, match=match):
        RelRegModule("vit_tiny_patch16_224", checkpoint=str(path), num_classes=4, model_kwargs=TINY)
    model = tiny_vit(num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_weights(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_08_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not weights")
    with pytest.raises(ValueError, match=r"Expected a weights file .* could not read '.*notes.pt'"):
        build_model("vit_tiny_patch16_224", checkpoint=path, num_classes=4, **TINY)


# ---------------------------------------------------------- 9. no attention blocks for chefer
@pytest.mark.parametrize("name", ["resnet", "sequential"])
def test_09_model_without_attention_for_an_attention_explainer(name):
    model = (
        timm.create_model("resnet18", num_classes=4)
        if name == "resnet"
        else nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    ).eval()
    before = model_state(model)
    with pytest.raises(ValueError, match=r"Expected a timm ViT with attention modules.*found none"):
        explain(model, torch.randn(2, 3, 32, 32), "chefer")
    assert model_state(model) == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="found none"):
        RelRegModule(model)


# ------------------------------------------------------------------ 10. unknown names
def test_10_unknown_explainer_lists_known_names():
    with pytest.raises(ValueError, match=r"Unknown explainer 'nope'; expected one of: .*chefer"):
        explain(tiny_vit(), torch.randn(1, 3, 32, 32), "nope")


def test_10_unknown_objective_term_lists_known_names():
    match = r"^Unknown objective term 'nope'; expected one of: (.*)\.$"
    known = {"robustvit", "mass", "rrr", "classification", "counterfactual", "faithfulness"}
    for build in (
        lambda: Objective([{"term": "nope"}]),
        lambda: RelRegModule(tiny_vit(), objective=[{"term": "nope", "weight": 0.8}]),
    ):
        with pytest.raises(ValueError, match=match) as info:
            build()
        listed = re.match(match, str(info.value)).group(1).split(", ")
        assert known <= set(listed), listed


# ------------------------------------------------- 11.-12., 14. the fine-tuning command
def demo_args(tmp_path: Path, **dirs: Path) -> list[str]:
    """``relreg fit`` on the demo configs with a tiny model, little data, a CSV logger, one step."""
    out = {"root": tmp_path / "run", "logs": tmp_path / "logs", "ckpt": tmp_path / "ckpt", **dirs}
    override = tmp_path / "tiny.yaml"
    override.write_text(
        f"""
trainer:
  default_root_dir: {out["root"]}
  max_steps: 1
  log_every_n_steps: 1
  logger:
    class_path: pytorch_lightning.loggers.CSVLogger
    init_args: {{save_dir: {out["logs"]}}}
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{dirpath: {out["ckpt"]}, save_last: true}}
model:
  model_kwargs: {{img_size: 32, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}}
data:
  batch_size: 4
  train: {{class_path: relreg.data.SpuriousShapes, init_args: {{split: unbiased, n: 8}}}}
  val: {{class_path: relreg.data.SpuriousShapes, init_args: {{split: val, n: 4}}}}
  test: {{class_path: relreg.data.SpuriousShapes, init_args: {{split: test, n: 4}}}}
  ood: {{ood: {{class_path: relreg.data.SpuriousShapes, init_args: {{split: ood, n: 4}}}}}}
"""
    )
    configs = [DEMO / "base.yaml", DEMO / "pretrain.yaml", override]
    return ["fit", *(a for c in configs for a in ("--config", str(c)))]


def test_11_config_key_with_a_typo(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  relevance_evry: 2\n")
    with pytest.raises(SystemExit) as info:
        main([*demo_args(tmp_path), "--config", str(typo)])
    assert info.value.code != 0
    assert "relevance_evry" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "setting, what", [("root", "default_root_dir"), ("logs", "CSVLogger"), ("ckpt", "dirpath")]
)
def test_12_unwritable_output_dir_fails_before_training(
    tmp_path, monkeypatch, capsys, setting, what
):
    (tmp_path / "file").write_text("a regular file, so nothing can be created below it")
    bad = tmp_path / "file" / "out"

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(RelRegModule, "training_step", no_training)
    assert main(demo_args(tmp_path, **{setting: bad})) == 2
    err = capsys.readouterr().err
    assert re.search(
        rf"relreg fit: error: Expected a writable .*{what}.*, but '{re.escape(str(bad))}' is not",
        err,
    ), err[-500:]
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))


# ---------------------------------------------------- 13. an error in the middle of relreg explain
def test_13_explain_error_midway_leaves_no_files(tmp_path, capsys):
    good = write_png(tmp_path / "good.png", np.zeros((40, 40, 3), np.uint8))
    bad = write_truncated_png(tmp_path / "bad.png")
    out = tmp_path / "out"
    arch = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8"]
    assert main(["explain", str(good), str(bad), *arch, "--out", str(out)]) == 2
    assert "bad.png" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------- 14. W&B not installed
def test_14_import_without_wandb():
    code = (
        "import sys; sys.modules['wandb'] = None\n"
        "import relreg, relreg.lightning, relreg.lightning.cli, relreg.cli\n"
        "assert sys.modules['wandb'] is None"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_14_fit_with_csv_logger_without_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ImportError):
        import wandb  # noqa: F401
    assert main(demo_args(tmp_path)) == 0
    assert "train/loss" in next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert list((tmp_path / "ckpt").glob("*.ckpt"))
