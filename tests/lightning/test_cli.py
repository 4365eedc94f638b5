"""relreg fit|validate|test via LightningCLI and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from relreg.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo"
PAPER = ROOT / "configs" / "paper"
TINY = [
    "--model.model_kwargs",
    "{img_size: 32, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}",
]


def _demo_args(stage: str, tmp_path: Path) -> list[str]:
    return [
        "--config",
        str(DEMO / "base.yaml"),
        "--config",
        str(DEMO / f"{stage}.yaml"),
        "--trainer.fast_dev_run",
        "true",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        *TINY,
    ]


@pytest.mark.parametrize("stage", ["pretrain", "bias", "relreg", "control"])
def test_demo_configs_fast_dev_run(stage, tmp_path):
    extra = (
        ["--data.train.init_args.cache_dir", str(tmp_path / "data")]
        if stage in ("relreg", "control")
        else []
    )
    assert main(["fit", *_demo_args(stage, tmp_path), *extra]) == 0


def test_validate_and_test_commands(tmp_path):
    assert main(["validate", *_demo_args("pretrain", tmp_path)]) == 0
    assert main(["test", *_demo_args("pretrain", tmp_path)]) == 0


@pytest.mark.parametrize("model", sorted(p.stem for p in PAPER.glob("*.yaml") if p.stem != "base"))
def test_paper_configs_parse(model, capsys):
    with pytest.raises(SystemExit) as info:
        main(
            [
                "fit",
                "--config",
                str(PAPER / "base.yaml"),
                "--config",
                str(PAPER / f"{model}.yaml"),
                "--print_config",
            ]
        )
    assert info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    weights = {t["term"]: t["weight"] for t in config["model"]["objective"]}
    relevance = "cft" if model == "cft" else "robustvit"  # cft.yaml swaps the relevance loss
    assert weights == {relevance: 0.8, "classification": 0.2}
    optimizer = config["model"]["optimizer"]
    assert optimizer["class_path"] == "torch.optim.AdamW"
    assert optimizer["init_args"]["lr"] < 1e-5 and config["trainer"]["inference_mode"] is False


def test_paper_config_runs_offline_on_a_generated_folder(tmp_path):
    from relreg.data import write_shapes_folder

    root = write_shapes_folder(tmp_path / "train", n=8, size=32)
    (tmp_path / "classes.txt").write_text("\n".join(["circle", "square", "triangle", "cross"]))
    classes = str(tmp_path / "classes.txt")
    args = [
        "fit",
        "--config",
        str(PAPER / "base.yaml"),
        "--config",
        str(PAPER / "augreg_s.yaml"),
        "--model.pretrained",
        "false",
        "--model.model",
        "vit_tiny_patch16_224",
        "--model.num_classes",
        "4",
        *TINY,
        "--data.train.init_args.root",
        str(root),
        "--data.train.init_args.img_size",
        "32",
        "--data.train.init_args.mask_format",
        "binary",
        "--data.train.init_args.classes",
        classes,
        "--data.val.init_args.root",
        str(root),
        "--data.val.init_args.img_size",
        "32",
        "--data.val.init_args.mask_format",
        "binary",
        "--data.val.init_args.classes",
        classes,
        "--data.ood",
        "{}",
        "--data.num_workers",
        "0",
        "--trainer.fast_dev_run",
        "true",
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    assert main(args) == 0


def test_config_typo_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", *_demo_args("pretrain", tmp_path), "--model.lamda_seg", "0.5"])
    assert info.value.code != 0
    assert "lamda_seg" in capsys.readouterr().err


def test_predict_command(tmp_path):
    assert main(["predict", *_demo_args("pretrain", tmp_path)]) == 0


def test_csv_logger_instead_of_wandb(tmp_path):
    args = [
        "fit",
        "--config",
        str(DEMO / "base.yaml"),
        "--config",
        str(DEMO / "pretrain.yaml"),
        *TINY,
        "--trainer.logger",
        "pytorch_lightning.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path),
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.check_val_every_n_epoch",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--data.train.init_args.n",
        "16",
        "--data.batch_size",
        "8",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "train/loss" in metrics and "val/acc" in metrics


def test_run_cli_gives_lightning_the_command_line_in_sys_argv_and_restores_it(monkeypatch):
    """Lightning's DDP launcher restarts the other ranks from sys.argv: it must be the command."""
    import sys

    import relreg.lightning.cli as lightning_cli

    seen = []

    def record(*_args, **kwargs):
        seen.append((list(sys.argv), kwargs["args"]))
        return "cli"

    monkeypatch.setattr(lightning_cli, "RelRegCLI", record)
    before = list(sys.argv)
    assert lightning_cli.run_cli(["fit", "--config", "c.yaml"]) == "cli"
    assert seen == [([before[0], "fit", "--config", "c.yaml"], None)]
    assert sys.argv == before
    assert lightning_cli.run_cli() == "cli"  # None: the process's own command line
    assert seen[-1] == (before, None)


def test_ckpt_path_hyperparameters_apply_and_the_path_is_checked_and_kept(tmp_path):
    """A readable --ckpt_path brings its model hyperparameters (Lightning's behaviour, kept), the
    saved config keeps the path, and the subcommand gets the checked path."""
    from relreg.lightning.cli import run_cli

    fitted = run_cli(["fit", *_demo_args("pretrain", tmp_path / "fit")])
    ckpt = tmp_path / "a.ckpt"
    fitted.trainer.save_checkpoint(ckpt)
    one_block = "{img_size: 32, patch_size: 8, embed_dim: 24, depth: 1, num_heads: 2}"
    args = [*_demo_args("pretrain", tmp_path / "val"), "--model.model_kwargs", one_block]
    cli = run_cli(["validate", *args, "--ckpt_path", str(ckpt)])
    assert len(cli.model.model.blocks) == 2  # the checkpoint's depth, not the command line's
    assert cli.config["validate"]["ckpt_path"] == str(ckpt)
    assert cli.config_init["validate"]["ckpt_path"] == str(ckpt)


def test_an_unreadable_ckpt_path_is_named_by_relreg_not_lightnings_parser(tmp_path, capsys):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    args = [
        "validate",
        *_demo_args("pretrain", tmp_path),
        "--ckpt_path",
        str(tmp_path / "bad.ckpt"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "relreg validate: error: checkpoint" in err and "bad.ckpt" in err
    assert "cannot be read" in err and "Parsing of ckpt_path" not in err
