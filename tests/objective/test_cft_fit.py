"""The ``cft`` term trains through ``relreg fit`` from YAML: the demo's CFT arm, one step, on
chefer maps and on attnlrp maps; the paper file sets CFT's constants."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from relreg.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("method", ["chefer", "attnlrp"])
def test_cft_trains_through_relreg_fit(tmp_path, method):
    override = tmp_path / "tiny.yaml"
    override.write_text(
        f"""
trainer:
  default_root_dir: {tmp_path / "run"}
  max_steps: 2
  log_every_n_steps: 1
  check_val_every_n_epoch: 1
  logger:
    class_path: pytorch_lightning.loggers.CSVLogger
    init_args: {{save_dir: {tmp_path / "logs"}}}
  callbacks: []
  enable_checkpointing: false
model:
  model_kwargs: {{img_size: 32, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}}
  explainer: {{method: {method}}}
data:
  batch_size: 4
  train: {{class_path: relreg.data.SpuriousShapes, init_args: {{split: train, n: 8}}}}
  val: {{class_path: relreg.data.SpuriousShapes, init_args: {{split: val, n: 4}}}}
  test: {{class_path: relreg.data.SpuriousShapes, init_args: {{split: test, n: 4}}}}
  ood: {{ood: {{class_path: relreg.data.SpuriousShapes, init_args: {{split: ood, n: 4}}}}}}
"""
    )
    configs = [CONFIGS / "demo" / "base.yaml", CONFIGS / "demo" / "cft.yaml", override]
    args = ["fit", *(a for c in configs for a in ("--config", str(c)))]
    assert main(args) in (0, None)
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in metrics[1:]]
    seg = [float(r["train/loss_seg"]) for r in rows if r.get("train/loss_seg")]
    assert len(seg) == 2 and all(v > 0 for v in seg)


def test_the_paper_file_sets_cfts_constants():
    objective = yaml.safe_load((CONFIGS / "paper" / "cft.yaml").read_text())["model"]["objective"]
    cft, classification = objective
    assert cft["term"] == "cft" and cft["weight"] == 0.8
    assert cft["options"] == {"lambda_ctx": 1.2, "lambda_concept": 0.5}
    assert classification["weight"] == 0.2
    assert classification["options"] == {"target": "self", "temperature": 1.0}
