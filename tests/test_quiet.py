"""Entry points hide known dependency noise; the library and all outside the block are untouched."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from relreg.quiet import quiet_dependencies

TIP = "💡 Tip: For seamless cloud logging, try installing another product."
PYTREE = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`"


def _emit(caplog) -> tuple[list[str], list[str]]:
    from lightning_fabric.utilities.rank_zero import rank_zero_info as fabric_info
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    caplog.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", append=True)  # after the filters under test
        warnings.warn(PYTREE, UserWarning, stacklevel=1)
        warnings.warn("Found 3 module(s) in eval mode at the start of training.", stacklevel=1)
        warnings.warn("your learning rate is NaN", UserWarning, stacklevel=1)
        rank_zero_info(TIP)
        fabric_info("GPU available: False, used: False")
        rank_zero_info("Epoch 3 finished")
    return [str(w.message) for w in seen], [r.getMessage() for r in caplog.records]


def test_known_noise_is_hidden_and_the_rest_is_kept(caplog):
    caplog.set_level(logging.INFO)
    loud_warnings, loud_lines = _emit(caplog)
    assert len(loud_warnings) == 3 and TIP in loud_lines
    with quiet_dependencies():
        quiet_warnings, quiet_lines = _emit(caplog)
    assert quiet_warnings == ["your learning rate is NaN"]
    assert TIP not in quiet_lines and "Epoch 3 finished" in quiet_lines
    assert "GPU available: False, used: False" in quiet_lines  # kept unless stages=True
    with quiet_dependencies(stages=True):
        _, stage_lines = _emit(caplog)
    assert stage_lines == ["Epoch 3 finished"]


def test_everything_is_restored_after_the_block_also_after_an_error(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    filters_before = list(warnings.filters)
    with pytest.raises(RuntimeError), quiet_dependencies(stages=True):
        assert os.environ["WANDB_SILENT"] == "true"
        raise RuntimeError("boom")
    assert "WANDB_SILENT" not in os.environ
    assert warnings.filters == filters_before
    loud_warnings, loud_lines = _emit(caplog)
    assert len(loud_warnings) == 3 and TIP in loud_lines


def test_a_users_wandb_setting_wins(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "false")
    with quiet_dependencies():
        assert os.environ["WANDB_SILENT"] == "false"
    assert os.environ["WANDB_SILENT"] == "false"


def test_importing_relreg_filters_nothing():
    import subprocess
    import sys

    deps = "torch, timm, torchvision, torchmetrics, pytorch_lightning, wandb, matplotlib"
    code = (
        f"import warnings, logging, {deps}; before = list(warnings.filters); "
        "import relreg.lightning, relreg.evaluation, relreg.cli, relreg.demo; "
        "assert list(warnings.filters) == before, 'relreg changed the warning filters'; "
        "assert not logging.getLogger('pytorch_lightning.utilities.rank_zero').filters"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
