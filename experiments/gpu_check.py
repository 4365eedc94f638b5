"""The project's GPU check: one script, one JSON, at most about 5 minutes on one GPU.

    python experiments/gpu_check.py --out experiments/results/gpu_check.json      # on a GPU
    python experiments/gpu_check.py --dry-run --out /tmp/gpu_check.json   # the same code, on CPU

1. **Engines on CUDA**: Chefer maps and the parameter gradients of a relevance loss from the
   chunked engine against the dense engine, in float32, bfloat16 and float16 (autocast), on
   ViT-S/16 at 224 px: the largest relative difference of each, against a tolerance per dtype.
2. **The training step's cost** at 224 / 384 / 518 px: the plain fine-tune step (fused attention:
   flash or memory-efficient kernels on CUDA) against the relevance step (chunked engine), time and
   ``torch.cuda.max_memory_allocated`` (``experiments/bench_train.py``'s worker, in this process).
3. **One short fine-tune** of the demo data (SpuriousShapes, the demo's tiny ViT, RobustViT's
   objective) through ``RelRegModule`` and a Lightning ``Trainer`` on the device.

The GPU machine runs its own image (Python 3.12, torch 2.11, Lightning, torchmetrics, timm; no
jsonargparse or wandb), so nothing here needs LightningCLI or W&B. ``--dry-run`` runs every
section on the CPU with tiny sizes (float16 skipped: CPU autocast is bfloat16 only); the tests
run it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# The two engines round at different points (dense: stored A and dy/dA; chunked: A recomputed by
# chunks), so under autocast they differ by a few roundings of the low-precision type at each of
# the blocks' products: bfloat16's unit roundoff is 2^-8 (3.9e-3), float16's 2^-11 (4.9e-4); the
# tolerances allow about 13 and 20 of them. float32 allows ~800 of its 2^-24 (the rule's products
# over the blocks and a different summation order).
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def engines(device: str, dry_run: bool) -> dict:
    """Chunked against dense: maps and a relevance loss's parameter gradients per dtype."""
    import timm

    from relreg.explain import explain

    torch.manual_seed(0)
    if dry_run:
        kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
        x = torch.randn(2, 3, 32, 32)
    else:
        model = timm.create_model("vit_small_patch16_224", pretrained=False)
        x = torch.randn(8, 3, 224, 224)
    model = model.to(device).eval()
    x = x.to(device)
    dtypes = ["float32", "bfloat16"] + ([] if device == "cpu" else ["float16"])
    out = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        results = {}
        for engine in ("dense", "chunked"):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.split(":")[0], dtype=dtype,
                                enabled=name != "float32"):  # fmt: skip
                maps = explain(model, x, "chefer", target=0, engine=engine, differentiable=True)
            maps.float().pow(2).mean().backward()
            grads = torch.cat(
                [p.grad.flatten().float() for p in model.parameters() if p.grad is not None]
            )
            results[engine] = (maps.detach().float(), grads)
        map_diff = _rel(results["chunked"][0], results["dense"][0])
        grad_diff = _rel(results["chunked"][1], results["dense"][1])
        out[name] = {
            "maps_rel_diff": map_diff,
            "grads_rel_diff": grad_diff,
            "tolerance": TOLERANCE[name],
            "ok": map_diff <= TOLERANCE[name] and grad_diff <= TOLERANCE[name],
        }
        print(f"engines {name:9s} maps {map_diff:.2e} grads {grad_diff:.2e}")
    return out


def step_cost(device: str, dry_run: bool) -> dict:
    """Plain against relevance step per image size (bench_train's worker, in this process)."""
    import bench_train

    out = {}
    if dry_run:
        cases = {"32": ("vit_tiny_32", None)}
    else:
        cases = {str(s): ("vit", s) for s in (224, 384, 518)}
    for size, (key, img_size) in cases.items():
        row = {}
        for case in ("plain", "first_order", "first_order_deferred"):
            row[case] = bench_train.worker(
                key, case, batch=2 if dry_run else 16, repeats=1 if dry_run else 5,
                device=device, relevance_every=1, img_size=img_size,
            )  # fmt: skip
        row["time_ratio"] = row["first_order"]["step_s"] / row["plain"]["step_s"]
        # CUDA's peak is reset per case; a CPU process's peak RSS is not, so in one process the
        # cases' CPU memory cannot be told apart (bench_train runs each case in its own process)
        cuda = device.startswith("cuda")
        row["deferred_time_ratio"] = row["first_order_deferred"]["step_s"] / row["plain"]["step_s"]
        for name, case in (
            ("memory_ratio", "first_order"),
            ("deferred_memory_ratio", "first_order_deferred"),
        ):
            row[name] = row[case]["step_peak_mb"] / row["plain"]["step_peak_mb"] if cuda else None
        out[size] = row
        memory = "-" if row["memory_ratio"] is None else f"x{row['memory_ratio']:.2f}"
        deferred = (
            "-" if row["deferred_memory_ratio"] is None else f"x{row['deferred_memory_ratio']:.2f}"
        )
        print(
            f"step {size} px: time x{row['time_ratio']:.2f}, memory {memory}; defer_gradients: "
            f"time x{row['deferred_time_ratio']:.2f}, memory {deferred}"
        )
    return out


def fine_tune(device: str, dry_run: bool) -> dict:
    """The demo's recipe for a few steps on the device, through RelRegModule and a Trainer."""
    import pytorch_lightning as pl

    from relreg.data import RelRegDataModule, SpuriousShapes
    from relreg.lightning import RelRegModule, connect

    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}
    module = RelRegModule("vit_tiny_patch16_224", num_classes=4, model_kwargs=kwargs)
    n = 16 if dry_run else 512
    data = RelRegDataModule(
        SpuriousShapes("train", n=n), SpuriousShapes("val", n=n // 2), batch_size=16
    )
    connect(module, data)
    trainer = pl.Trainer(
        accelerator="cpu" if device == "cpu" else "gpu", devices=1,
        max_steps=2 if dry_run else 200, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, inference_mode=False, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    found = trainer.validate(module, datamodule=data, verbose=False)[0]
    metrics = {k: float(v) for k, v in found.items()}
    print(f"fine-tune: {seconds:.1f} s, val/acc {metrics.get('val/acc', float('nan')):.3f}")
    return {"seconds": seconds, "steps": trainer.global_step, "val": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/gpu_check.json"))
    parser.add_argument("--dry-run", action="store_true", help="the same code on CPU, tiny sizes")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    args = parser.parse_args()
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("Expected a CUDA device for the GPU check; use --dry-run on a CPU.")
    start = time.perf_counter()
    report = {
        "device": device,
        "device_name": torch.cuda.get_device_name(device)
        if device != "cpu"
        else platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dry_run": args.dry_run,
        "engines": engines(device, args.dry_run),
        "step_cost": step_cost(device, args.dry_run),
        "fine_tune": fine_tune(device, args.dry_run),
    }
    report["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)  # no relreg.io import: the check runs where relreg is only on the path
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
