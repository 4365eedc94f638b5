"""Benchmark: the cost of the relevance loss in a training step, against a plain fine-tune step.

Cases (one optimiser step each, the same AdamW and classification term):
- ``plain``: cross-entropy fine-tune step (timm's fused attention), no relevance;
- ``first_order``: relreg's step, ``differentiable=True`` (the paper's rule: attention gradients
  as constants), one forward pass for logits and relevance;
- ``second_order``: relreg's step with ``second_order=True`` (``create_graph=True``);
- ``two_forward``: a RobustViT-style step reproduced here: the relevance from one forward pass and
  the classification loss from a second forward pass.

Each case runs in its own subprocess so that its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the growth of the process's peak RSS over the RSS after
the model, optimiser and batch are set up (``step_peak_mb``; ``peak_mb`` is the whole process).
On every device, ``graph_mb`` counts the bytes of the tensors the autograd graph saves for the
backward pass (parameters excluded): exact and independent of the allocator.
Reports the median of the repetitions after one warm-up step (the mean with ``--relevance-every``
k > 1; use a multiple of k repeats), and ratios to ``plain`` from the same run. Writes JSON and a
figure.

    python experiments/bench_train.py --out experiments/results/bench_train.json
    python experiments/bench_train.py --quick --out /tmp/bench_train.json    # ViT-S only, < 2 min
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine_info import machine  # experiments/machine_info.py (this script's folder)

CASES = ("plain", "first_order", "second_order", "two_forward")
MODELS = {
    "vit_small_224": ("vit_small_patch16_224", {}, 224),
    "vit_tiny_32": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 32),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(
    model_key: str, case: str, batch: int, repeats: int, device: str, relevance_every: int
) -> dict:
    """Run one case in this process; returns its timings and memory."""
    import torch

    from relreg.explain import explain, to_pixels
    from relreg.lightning import RelRegModule
    from relreg.losses import classification_loss

    torch.manual_seed(0)
    name, kwargs, size = MODELS[model_key]
    module = RelRegModule(
        name, num_classes=1000, model_kwargs=kwargs, second_order=case == "second_order",
        lambda_seg=0.0 if case == "plain" else 0.8, lr=1e-6,
    ).to(device)  # fmt: skip
    optimizer = module.configure_optimizers()["optimizer"]
    images = torch.randn(batch, 3, size, size, device=device)
    masks = torch.zeros(batch, size, size, device=device)
    masks[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    data = {"image": images, "label": torch.arange(batch, device=device) % 10, "mask": masks}
    data["has_mask"] = torch.ones(batch, dtype=torch.bool, device=device)
    step_count = 0

    def forward_loss(relevance: bool) -> torch.Tensor:
        if case == "two_forward":
            maps = explain(
                module.model, images, "chefer", target=data["label"], differentiable=True
            )
            rel = module.relevance_loss(
                to_pixels(maps, size=(size, size)), masks, data["has_mask"]
            )["loss"]
            logits = module.model(
                images
            )  # RobustViT's second forward pass, for the classification term
            return module.lambda_seg * rel + module.lambda_cls * classification_loss(logits, "self")
        return module.model_step(data, relevance=relevance)["loss"]

    def step() -> None:
        nonlocal step_count
        loss = forward_loss(case != "plain" and step_count % relevance_every == 0)
        step_count += 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def graph_mb() -> float:
        """Bytes of the tensors the autograd graph saves for the backward pass (parameters excluded)."""
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward_loss(case != "plain")
        del loss
        return sum(saved.values()) / 2**20

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        step()
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
    # With the relevance loss every k steps the cost alternates: the mean is the cost per step.
    middle = statistics.median(times) if relevance_every == 1 else statistics.fmean(times)
    result = {"step_s": middle, "step_s_all": [round(t, 4) for t in times]}
    result["graph_mb"] = graph_mb()
    if device.startswith("cuda"):
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["step_peak_mb"] = result["peak_mb"]
    else:
        result["peak_mb"] = _rss_mb()
        result["step_peak_mb"] = _rss_mb() - base_rss
    return result


def run_case(model_key: str, case: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--model", model_key, "--case", case, "--batch", str(args.batch),
        "--repeats", str(args.repeats), "--device", args.device, "--relevance-every", str(args.relevance_every),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), constrained_layout=True)
    width = 0.8 / len(models)
    for j, key in enumerate(("time_ratio", "memory_ratio", "graph_ratio")):
        ax = axes[j]
        for i, m in enumerate(models):
            ratios = [result["models"][m]["ratios"][c][key] for c in CASES]
            bars = ax.bar([k + i * width for k in range(len(CASES))], ratios, width, label=m)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.5, color="gray", ls="--", lw=0.8)
        ax.set_xticks(
            [k + width * (len(models) - 1) / 2 for k in range(len(CASES))], CASES, fontsize=8
        )
        ax.set_ylabel(
            {
                "time_ratio": "step time",
                "memory_ratio": "step peak memory",
                "graph_ratio": "autograd graph memory",
            }[key]
            + " / plain"
        )
        ax.legend(fontsize=8)
    fig.suptitle(
        f"training step, batch {result['batch']}, {result['machine']['device']} ({result['machine']['torch_threads']} threads)",
        fontsize=9,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--relevance-every", type=int, default=1, help="relevance loss every k steps"
    )
    parser.add_argument("--quick", action="store_true", help="ViT-S only, batch 8, 2 repeats")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_train.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="vit_small_224", help=argparse.SUPPRESS)
    parser.add_argument("--case", default="plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(
            json.dumps(
                worker(
                    args.model,
                    args.case,
                    args.batch,
                    args.repeats,
                    args.device,
                    args.relevance_every,
                )
            )
        )
        return
    if args.quick:
        args.models, args.batch, args.repeats = ["vit_small_224"], 8, 2
    result = {
        "device": args.device,
        "batch": args.batch,
        "repeats": args.repeats,
        "relevance_every": args.relevance_every,
        "models": {},
    }
    for m in args.models:
        cases = {}
        for case in CASES:
            cases[case] = run_case(m, case, args)
            c = cases[case]
            print(
                f"{m:14s} {case:13s} {c['step_s']:.3f} s/step  step peak {c['step_peak_mb']:.0f} MB  graph {c['graph_mb']:.0f} MB",
                flush=True,
            )
        plain = cases["plain"]
        ratios = {
            c: {
                "time_ratio": round(cases[c]["step_s"] / plain["step_s"], 3),
                "memory_ratio": round(
                    cases[c]["step_peak_mb"] / max(plain["step_peak_mb"], 1e-9), 3
                ),
                "graph_ratio": round(cases[c]["graph_mb"] / plain["graph_mb"], 3),
            }
            for c in CASES
        }
        result["models"][m] = {"cases": cases, "ratios": ratios}
    main_model = "vit_small_224" if "vit_small_224" in result["models"] else args.models[0]
    result["cases"] = result["models"][main_model]["cases"]
    result["machine"] = machine(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({m: r["ratios"] for m, r in result["models"].items()}, indent=2))


if __name__ == "__main__":
    main()
