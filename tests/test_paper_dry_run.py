"""The paper's protocol end to end on generated data in every native layout, with the real
ViT-B/16 architecture (random weights): ``relreg prepare imagenet-s``, then ``relreg fit`` with
``configs/paper/base.yaml`` + ``vit_b16.yaml`` and nothing but dataset roots and a short schedule,
then ``relreg evaluate`` on the checkpoint it wrote.

It stands for the run a user makes on real data (issue 14): the configs, the ImageNet-S
selection, every OOD suite's layout and class mapping, the preprocessing taken from the model,
the callbacks and the checkpoint all meet here once.

The model is ViT-B/16 at 64 px instead of 224 (``model_kwargs: {img_size: 64}``: the same
blocks, widths and patch size, a shorter position table); the datasets follow it through
``preprocessing: model``. At 224 px the test took 125 s on 2 CPU cores, 57 s of it in the
blocks' linear layers, more than the CI budget allows.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import wandb
import yaml

from relreg.cli import main
from relreg.data import label_space
from tests.trees import folder_tree, imagenet_s_tree, objectnet_tree

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"


def _ood_trees(root: Path) -> dict[str, Path]:
    """One tiny split per OOD suite of base.yaml, keyed by its name there."""
    r = list(label_space("imagenet-r"))[:2]
    a = list(label_space("imagenet-a"))[:2]
    trees = {
        "imagenet_r": folder_tree(root / "imagenet-r", r),
        "imagenet_a": folder_tree(root / "imagenet-a", a),
        "imagenet_sketch": folder_tree(root / "sketch", list(label_space("imagenet"))[5:7]),
        "imagenet_v2": folder_tree(root / "imagenetv2", ["0", "954"]),  # class-index folders
        "objectnet": objectnet_tree(root),
    }
    for split, factor in (("size", "area"), ("location", "location20_area02_min0pc")):
        trees[f"si_score_{split}"] = folder_tree(root / "si-score" / factor, ["banana", "jeans"])
    trees["si_score_rotation"] = folder_tree(root / "si-score" / "rotation", ["kite", "pig"])
    return trees


def _logged_keys(runs: Path, wait_s: float = 20.0) -> set[str]:
    """The metric and config keys in the offline W&B run file (offline runs write no summary
    JSON; the keys are stored as plain strings in its records). W&B's service may still be
    writing the file when ``wandb.finish()`` returns on a loaded machine (a fresh-clone CI run
    once read it empty), so the file is read again until it holds keys, for at most ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        (run,) = runs.rglob("run-*.wandb")
        keys = {
            k.decode()
            for k in re.findall(rb"(?:ood|val|train|data)/[A-Za-z0-9_/]+", run.read_bytes())
        }
        if keys or time.monotonic() > deadline:
            return keys
        time.sleep(0.5)


@pytest.mark.slow
def test_paper_protocol_dry_run(tmp_path, capsys):
    wnids = sorted(label_space("imagenet"))[100:104]
    masks, images = imagenet_s_tree(tmp_path / "imagenet-s", wnids, files_per_class=4, size=32)
    subsets = tmp_path / "subsets"
    prepare = ["prepare", "imagenet-s", "--masks", str(masks), "--images", str(images)]
    prepare += ["--out", str(subsets), "--train-classes", "2"]
    assert main(prepare) == 0
    ood = _ood_trees(tmp_path / "ood")
    base = yaml.safe_load((CONFIGS / "base.yaml").read_text())
    assert set(base["data"]["ood"]) == set(ood)  # every suite of the config has a tree here
    roots = [
        f"--data.train.init_args.root={subsets / 'train'}",
        f"--data.val.init_args.root={subsets / 'val'}",
    ]
    roots += [f"--data.ood.{name}.init_args.root={path}" for name, path in ood.items()]
    runs = tmp_path / "runs"
    # base.yaml's callbacks, due every epoch instead of every second one: one epoch suffices
    callbacks = base["trainer"]["callbacks"]
    for cb in callbacks:
        if "every_n_epochs" in cb.get("init_args", {}):
            cb["init_args"]["every_n_epochs"] = 1
    every_epoch = tmp_path / "every_epoch.yaml"
    every_epoch.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    argv = [
        "fit",
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "vit_b16.yaml"),
    ]
    argv += ["--config", str(every_epoch), *roots]
    argv += ["--model.pretrained=false", "--model.model_kwargs={img_size: 64}"]
    argv += [f"--trainer.logger.init_args.save_dir={runs}", "--trainer.max_epochs=1"]
    argv += ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    argv += ["--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu", "--trainer.devices=1"]
    argv += ["--data.batch_size=2", "--data.eval_batch_size=2", "--data.num_workers=0"]
    t0 = time.perf_counter()
    try:
        assert main(argv) == 0
    finally:
        wandb.finish()  # flushes the offline run file read below
    print(f"fit {time.perf_counter() - t0:.1f} s")
    checkpoints = sorted(runs.rglob("best-*.ckpt"))
    assert checkpoints, f"no checkpoint under {runs}"
    logged = _logged_keys(runs)
    for name in ood:  # every OOD split was evaluated and logged
        assert f"ood/{name}/acc" in logged, sorted(logged)
    assert {"val/xai/relevance_mass", "val/xai/pointing_game", "data/preprocessing"} <= logged
    assert list(runs.rglob("media/images/val/xai/heatmaps*.png")), "no heatmap was logged"
    out = tmp_path / "eval"
    specs = [f"{name}={path}" for name, path in ood.items()]
    argv = ["evaluate", "--checkpoint", str(checkpoints[-1]), "--data", str(subsets / "val")]
    argv += ["--ood", *specs, "--methods", "chefer", "--steps", "2", "--limit", "2"]
    argv += ["--batch-size", "2", "--num-heatmaps", "2", "--out", str(out), "--device", "cpu"]
    t0 = time.perf_counter()
    assert main(argv) == 0, capsys.readouterr().err
    print(f"evaluate {time.perf_counter() - t0:.1f} s")
    report = json.loads((out / "report.json").read_text())
    accuracy = next(iter(report["models"].values()))["accuracy"]
    assert set(accuracy) == {"data", *ood}
    assert report["preprocessing"]["data"]["source"].startswith("model:vit_base_patch16_224")
