"""FSDP2 (``fully_shard``) with the relevance step, on CPU: two gloo processes.

Lightning's ``FSDPStrategy`` refuses a CPU accelerator; FSDP2 through ``ModelParallelStrategy``
does not, and torch's ``fully_shard`` takes CPU meshes. Tested here:

- one optimiser step's gradients on two ranks, each with half the batch (the same number of masked
  samples), equal the single-process step's on the whole batch, within twice the float64
  rounding bound of that step (the two differ only in how the batch's sums are blocked);
- the chunked engine's forward pass and its ``dy/dO`` pass reduce-scatter nothing (the collectives
  are counted): every gradient is reduced in the loss's backward pass, once per FSDP unit;
- Lightning's ``ModelParallelStrategy`` fits, saves a sharded and a full checkpoint, and resumes
  from each to the same weights;
- gradient checkpointing on: the same gradients, the blocks' reruns gathered and resharded;
- what is refused is refused before any work, with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relreg.lightning import RelRegModule
from relreg.lightning.sharding import check_shardable
from tests.ddp import run_two_ranks
from tests.numerics import U64, twin_bound

ROOT = Path(__file__).resolve().parents[2]
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
BATCH = 4


def _module(checkpointing: bool = False) -> RelRegModule:
    torch.manual_seed(0)
    module = RelRegModule(
        "vit_tiny_patch16_224",
        num_classes=4,
        model_kwargs={**TINY, "grad_checkpointing": checkpointing},
        explainer={"engine": "chunked"},  # raises rather than falling back to the dense engine
    )
    return module.double()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    masks = torch.zeros(BATCH, 32, 32, dtype=torch.float64)
    masks[:, 8:24, 4:20] = 1
    return {
        "image": torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64),
        "label": torch.tensor([0, 1, 2, 3]),
        "mask": masks,
        "has_mask": torch.ones(BATCH, dtype=torch.bool),
    }


def _grads_one_process() -> torch.Tensor:
    module = _module()
    module.model_step(_batch(), training=True).loss.backward()
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def _rank(rank: int, out: str, checkpointing: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from relreg.lightning.sharding import shard_model

    module = _module(checkpointing)
    shard_model(module.model, init_device_mesh("cpu", (2,)))
    half = {k: v[rank * 2 : rank * 2 + 2] for k, v in _batch().items()}  # 2 masked samples each

    counts = {"forward": {}, "backward": {}}
    phase = ["forward"]
    originals = {n: getattr(dist, n) for n in ("all_gather_single", "reduce_scatter_single")}

    def counted(name):
        def call(*args, **kwargs):
            counts[phase[0]][name] = counts[phase[0]].get(name, 0) + 1
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(dist, name, counted(name))
    try:
        loss = module.model_step(half, training=True).loss  # forward, dy/dO pass, relevance walk
        gathered = [b._get_fsdp_state()._fsdp_param_group.is_unsharded for b in module.model.blocks]
        phase[0] = "backward"
        loss.backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    grads = torch.cat([p.grad.full_tensor().flatten() for p in module.parameters()])
    torch.save(
        {"grads": grads, "counts": counts, "gathered": gathered}, Path(out) / f"rank{rank}.pt"
    )


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_two_rank_fsdp_step_equals_the_one_process_step_and_reduces_only_in_backward(
    tmp_path, checkpointing
):
    run_two_ranks(_rank, str(tmp_path), checkpointing)
    reference = _grads_one_process()  # without checkpointing: the same gradients are expected
    bound = twin_bound(_grads_one_process, u=U64)
    depth = TINY["depth"]
    units = depth + 1  # one FSDP unit per block, and the root
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert (got["grads"] - reference).abs().le(bound).all(), rank
        counts = got["counts"]
        assert counts["forward"].get("reduce_scatter_single", 0) == 0, counts
        assert counts["backward"]["reduce_scatter_single"] == units, counts
        # every unit is gathered for the forward pass and, resharded after it, again for the
        # dy/dO pass (checkpointed: each block once more for the walk's rerun up to its kernel
        # call), and once more in the loss's backward pass (checkpointed: each block also for the
        # walk's recomputation there)
        reruns = depth if checkpointing else 0
        assert counts["forward"]["all_gather_single"] == 2 * units + reruns, counts
        assert counts["backward"]["all_gather_single"] == units + reruns, counts
        assert not any(got["gathered"])  # no block is left gathered between the walk and backward


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="Expected a model with a list of residual blocks"):
        check_shardable(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_tensor_parallel_mesh_is_refused():
    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return type("Dim", (), {"size": lambda self: 2})()

    module = RelRegModule("vit_tiny_patch16_224", num_classes=4, model_kwargs=TINY)
    module._device_mesh = Mesh()
    with pytest.raises(ValueError, match="tensor_parallel_size=1.*but got tensor_parallel_size=2"):
        module.configure_model()


_FIT = """
import json, sys
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from relreg.data import RelRegDataModule, SpuriousShapes
from relreg.lightning import RelRegModule, connect
from relreg.lightning.sharding import is_sharded

out, sharded, resume = sys.argv[1], sys.argv[2] == "sharded", sys.argv[3]
pl.seed_everything(0)
module = RelRegModule("vit_tiny_patch16_224", num_classes=4, model_kwargs=%(tiny)r,
                      explainer={"engine": "chunked", "evaluate": False})
data = RelRegDataModule(train=SpuriousShapes(n=16, size=32), batch_size=4, num_workers=0)


def qkv(module):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist()
            for k, v in module.model.state_dict().items() if k.endswith("qkv.weight")}


class AtStart(pl.Callback):
    def on_train_start(self, trainer, module):
        weights = qkv(module)  # a collective: every rank
        if trainer.global_rank == 0:
            json.dump({"step": trainer.global_step, "qkv": weights},
                      open(f"{out}/start{trainer.global_step}.json", "w"))

connect(module, data)
trainer = pl.Trainer(
    accelerator="cpu", devices=2, max_steps=4 if resume != "none" else 2,
    strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                   save_distributed_checkpoint=sharded),
    logger=False, enable_progress_bar=False, enable_model_summary=False,
    limit_val_batches=0, default_root_dir=out, inference_mode=False, callbacks=[AtStart()],
)
trainer.fit(module, data, ckpt_path=None if resume == "none" else resume)
ckpt = f"{out}/after{trainer.global_step}.ckpt"
trainer.save_checkpoint(ckpt)
full = qkv(module)
if trainer.global_rank == 0:
    json.dump({"step": trainer.global_step, "ckpt": ckpt, "qkv": full,
               "sharded": is_sharded(module.model) and all(map(is_sharded, module.model.blocks))},
              open(f"{out}/result{trainer.global_step}.json", "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sharded", "full"])
def test_model_parallel_strategy_fits_saves_and_resumes(tmp_path, layout):
    script = tmp_path / "fit.py"
    script.write_text(_FIT % {"tiny": TINY})
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}

    def run(resume: str) -> None:
        cmd = [sys.executable, str(script), str(tmp_path), layout, resume]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-4000:]

    run("none")
    first = json.loads((tmp_path / "result2.json").read_text())
    assert first["step"] == 2 and first["sharded"]  # configure_model made the FSDP units
    assert Path(first["ckpt"]).is_dir() == (layout == "sharded")  # one file per rank, or one
    run(first["ckpt"])
    start = json.loads((tmp_path / "start2.json").read_text())
    assert start["qkv"] == first["qkv"]  # resumed from exactly the saved weights
    second = json.loads((tmp_path / "result4.json").read_text())
    assert second["step"] == 4  # resumed at step 2, two more steps
    assert second["qkv"].keys() == first["qkv"].keys()
    assert any(second["qkv"][k] != first["qkv"][k] for k in first["qkv"])  # it trained on
