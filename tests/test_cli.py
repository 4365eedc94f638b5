"""The relreg console script: explain writes overlays and raw maps; errors are clear."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from relreg.cli import main
from relreg.data import make_shapes

ARCH = [
    "--model",
    "vit_tiny_patch16_224",
    "--img-size",
    "32",
    "--patch-size",
    "8",
    "--num-classes",
    "4",
]


@pytest.fixture
def files(tmp_path):
    batch = make_shapes(3, size=40, num_classes=3, seed=0)
    paths = []
    for i, img in enumerate(batch.images):
        p = tmp_path / f"img{i}.png"
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(p)
        paths.append(p)
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8
    )
    torch.save(model.state_dict(), tmp_path / "w.pt")
    return paths, tmp_path / "w.pt", model.eval()


def test_explain_writes_overlay_and_raw_map(files, tmp_path, capsys):
    images, ckpt, model = files
    out = tmp_path / "out"
    assert (
        main(
            [
                "explain",
                *map(str, images),
                *ARCH,
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out),
                "--target",
                "2",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    for p in images:
        raw = np.load(out / f"{p.stem}_chefer.npy")
        assert raw.shape == (4, 4) and np.isfinite(raw).all()
        with Image.open(out / f"{p.stem}_chefer.png") as im:
            assert im.size[0] > 100
    assert "wrote 6 files" in capsys.readouterr().out


def test_explain_refuses_to_overwrite(files, tmp_path, capsys):
    images, ckpt, _ = files
    args = [
        "explain",
        str(images[0]),
        *ARCH,
        "--checkpoint",
        str(ckpt),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 0
    before = (tmp_path / "o" / "img0_chefer.npy").read_bytes()
    assert main([*args, "--method", "chefer", "--target", "1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "img0_chefer.npy").read_bytes() == before
    assert main([*args, "--overwrite", "--target", "1"]) == 0


def test_explain_bad_image_fails_before_writing(files, tmp_path, capsys):
    images, ckpt, _ = files
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "o"
    assert (
        main(
            [
                "explain",
                str(images[0]),
                str(bad),
                *ARCH,
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "bad.png" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_pretrained_offline_message(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images, _, _ = files
    assert (
        main(
            [
                "explain",
                str(images[0]),
                "--model",
                "vit_tiny_patch16_224",
                "--pretrained",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--checkpoint PATH" in capsys.readouterr().err


def test_target_out_of_range_message(files, tmp_path, capsys):
    images, ckpt, _ = files
    assert (
        main(
            [
                "explain",
                str(images[0]),
                *ARCH,
                "--checkpoint",
                str(ckpt),
                "--out",
                str(tmp_path / "o"),
                "--target",
                "9",
            ]
        )
        == 2
    )
    assert "target classes in [0, 3]" in capsys.readouterr().err


def test_a_full_disk_during_a_lightning_command_is_one_line(monkeypatch, capsys):
    import errno

    import relreg.lightning.cli as lightning_cli
    from relreg.cli import main

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device while writing 'x.png' (...)")

    monkeypatch.setattr(lightning_cli, "run_cli", full)
    assert main(["fit", "--config", "nope.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["relreg fit: error: No space left on device while writing 'x.png' (...)"]


def test_explain_titles_name_the_class_and_warn_without_weights(files, tmp_path, monkeypatch):
    import relreg.viz

    images, _, _ = files
    titles = []
    original = relreg.viz.overlay_figure

    def record(image, pixel_map, title="", alpha=0.5):
        titles.append(title)
        return original(image, pixel_map, title=title, alpha=alpha)

    monkeypatch.setattr(relreg.viz, "overlay_figure", record)
    arch = [a if a != "4" else "1000" for a in ARCH]  # an ImageNet-sized head: timm's names
    args = ["explain", str(images[0]), *arch, "--out", str(tmp_path / "o"), "--target", "1"]
    with pytest.warns(UserWarning, match="randomly initialised vit_tiny_patch16_224"):
        assert main([*args, "--foil", "0"]) == 0
    assert titles[0].startswith("img0_chefer (chefer): goldfish (#1, p=")
    assert " vs tench (#0, p=" in titles[0]


def test_explanation_title_reports_top1_probability():
    from relreg.viz import explanation_title

    probs = torch.tensor([0.2, 0.7, 0.1])
    names = ["cat", "dog", "fox"]
    assert explanation_title("x", probs, names) == "x: dog (#1, p=0.70)"
    assert explanation_title("x", probs, names, 2, 0) == "x: fox (#2, p=0.10) vs cat (#0, p=0.20)"


def test_help_lists_every_command_in_plain_text(capsys):
    from relreg.cli import LIGHTNING_COMMANDS
    from relreg.lightning.cli import RelRegCLI

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":class:" not in text
    listed = text.split("positional arguments:")[1]
    commands = [
        "fit",
        "validate",
        "test",
        "predict",
        "explain",
        "evaluate",
        "demo",
        "prepare",
        "masks",
        "dfr",
    ]
    choices = "{" + ",".join(commands) + "}"
    assert choices in listed  # argparse's list of the subcommands, in order
    for command in commands:
        assert any(line.split()[:1] == [command] for line in listed.splitlines()), command
    # every command LightningCLI runs is listed, and relreg dispatches each of them to it
    assert set(LIGHTNING_COMMANDS) == set(RelRegCLI.subcommands())


def test_the_lightning_commands_still_reach_lightningcli_for_their_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    assert "--trainer.max_epochs" in capsys.readouterr().out


def test_no_module_in_relreg_imports_unittest():
    import ast
    from pathlib import Path

    import relreg

    found = []
    for path in sorted(Path(relreg.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            found += [f"{path}: {n}" for n in names if n.split(".")[0] == "unittest"]
    assert not found, "\n".join(found)
