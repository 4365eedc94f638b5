"""``relreg dfr``: DFR^Val as a stage after ``relreg fit`` on Waterbirds.

The checkpoint's model gets its head retrained on the validation split
(:func:`relreg.baselines.deep_feature_reweighting`, the paper's held-out set: half to fit, half
to tune ``C``), the test split is scored before and after (accuracy, worst- and average-group
accuracy), and the new weights are written atomically, with a JSON report beside them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from relreg.baselines.dfr import deep_feature_reweighting
from relreg.data import Preprocessing, Waterbirds
from relreg.io import atomic_write, check_writable
from relreg.metrics import dataset_scores
from relreg.models import model_from_checkpoint
from relreg.validate import check_positive_int

__all__ = ["run_dfr"]


def run_dfr(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num_retrains: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict:
    """Retrain the head of a ``relreg fit`` checkpoint's model with DFR^Val on Waterbirds.

    Args:
        checkpoint: a ``relreg fit`` checkpoint (it names its architecture).
        data: Waterbirds' root (``metadata.csv``); the validation split is the held-out set.
        out: the new weights (a ``state_dict`` file); ``<out>.json`` gets the report.
        num_retrains, seed: :func:`relreg.baselines.deep_feature_reweighting`'s.
        batch_size: images per forward pass.
        device: where the model runs.

    Returns:
        The report: the chosen ``C``, the tuning scores, the test scores before and after.
    """
    check_positive_int("batch_size", batch_size)
    out = Path(out)
    check_writable(out.parent, "--out's folder")
    model = model_from_checkpoint(checkpoint).to(device)
    pre = Preprocessing.from_model(model)
    held_out = Waterbirds(data, "val", train=False, preprocessing=pre)
    test = Waterbirds(data, "test", train=False, preprocessing=pre)
    before = dataset_scores(model, test, batch_size, device)
    result = deep_feature_reweighting(
        model, held_out, num_retrains=num_retrains, seed=seed, batch_size=batch_size
    )
    after = dataset_scores(model, test, batch_size, device)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    report = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "variant": "DFR^Val (deep_feature_reweighting dfr_evaluate_spurious.py, 46666e6)",
        "c": result.c,
        "tuning_worst_group_acc": {str(c): v for c, v in result.tuning.items()},
        "test_before": before,
        "test_after": after,
        "weights": str(out),
    }
    text = json.dumps(report, indent=2)
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    return report
