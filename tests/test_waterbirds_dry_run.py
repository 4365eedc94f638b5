"""The Waterbirds configs end to end on a generated tree in Waterbirds' native layout, with
nothing but the roots and a tiny model: ``relreg fit`` for ERM, the counterfactual recipe on
CUB's masks and GroupDRO with group-balanced sampling, then ``relreg dfr`` on the ERM checkpoint
and ``relreg evaluate`` on it (worst-group accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from relreg.cli import main
from tests.trees import waterbirds_tree

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "waterbirds"
TINY = "{img_size: 32, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}"


def _fit(tmp_path: Path, name: str, data: Path, segs: Path, *configs: str) -> Path:
    run = tmp_path / name
    args = ["fit", "--config", str(CONFIGS / "base.yaml")]
    for config in configs:
        args += ["--config", str(CONFIGS / config)]
    for split in ("train", "val", "test"):
        args += [f"--data.{split}.init_args.root", str(data)]
    args += [
        "--data.train.init_args.masks", str(segs),
        "--model.model", "vit_tiny_patch16_224",
        "--model.pretrained", "false",
        "--model.model_kwargs", TINY,
        "--trainer.max_epochs", "1",
        "--trainer.max_steps", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(run),
        "--trainer.logger.init_args.save_dir", str(run),
        "--data.batch_size", "4",
    ]  # fmt: skip
    assert main(args) in (0, None)
    (last,) = run.rglob("last.ckpt")
    return last


@pytest.mark.slow
def test_waterbirds_configs_fit_then_dfr_then_evaluate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    data, segs = waterbirds_tree(tmp_path / "data")
    erm = _fit(tmp_path, "erm", data, segs)
    _fit(tmp_path, "counterfactual", data, segs, "counterfactual.yaml")
    _fit(tmp_path, "group_dro", data, segs, "group_dro.yaml")
    out = tmp_path / "dfr" / "dfr.pt"
    (tmp_path / "dfr").mkdir()
    assert main(["dfr", "--checkpoint", str(erm), "--data", str(data), "--out", str(out),
                 "--num-retrains", "2"]) == 0  # fmt: skip
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["test_after"]) == {"acc", "worst_group_acc", "average_group_acc"}
    assert report["c"] in (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
    state = torch.load(out, weights_only=True)
    assert "head.weight" in state and state["head.weight"].shape[0] == 2
    assert "test after DFR: acc" in capsys.readouterr().out
    eval_out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(erm),
                "--data",
                str(data),
                "--methods",
                "rollout",
                "--steps",
                "1",
                "--num-heatmaps",
                "0",
                "--out",
                str(eval_out),
            ]
        )
        == 0
    )
    entry = next(iter(json.loads((eval_out / "report.json").read_text())["models"].values()))
    assert set(entry["groups"]["data"]) == {"worst_group_acc", "average_group_acc"}


@pytest.mark.parametrize("config", ["counterfactual.yaml", "robustvit_cf.yaml", "group_dro.yaml"])
def test_every_waterbirds_config_parses_onto_the_base(config, capsys):
    import yaml

    args = ["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / config)]
    with pytest.raises(SystemExit) as info:
        main([*args, "--print_config"])
    assert info.value.code == 0
    merged = yaml.safe_load(capsys.readouterr().out)
    terms = [t["term"] for t in merged["model"]["objective"]]
    assert "classification" in terms or terms == ["group_dro"]
    assert merged["data"]["train"]["class_path"] == "relreg.data.Waterbirds"
    assert merged["model"]["num_classes"] == 2
