"""Benchmark: batched Chefer relevance versus one image at a time and versus a plain training step.

For timm ViT-S/16 at 224 px (random weights) and a batch of 16, times per image:
- ``batched``: ``relreg.explain.explain(model, x, "chefer")`` on the whole batch (one forward and
  one backward that stops at the attention outputs; the default chunked engine, fused attention
  kept);
- ``batched_dense``: the same with ``engine="dense"`` (fused attention off, every block's
  ``(B, heads, N, N)`` attention and gradient stored), for methods with an ``engine`` option;
- ``one_at_a_time``: the same call per image (as the CVPR 2021 reference code runs);
- ``forward_backward``: one plain forward + backward of the same batch with parameter gradients
  (timm's default fused attention), i.e. the cost of a training step without the optimiser.

Writes JSON (medians of all repetitions, ratios from the same run, machine) and a bar chart.

    python experiments/bench_explain.py --out experiments/results/bench_explain.json

``--chunking`` measures instead what ``internal_batch_size`` buys the many-copy explainers
(smoothgrad, integrated_gradients, occlusion, lime): each (method, internal batch size) runs in a
fresh process, which reports its peak resident memory (``ru_maxrss``), its time and its maps; the
JSON states the largest difference of each chunked map from the unchunked one.

    python experiments/bench_explain.py --chunking \\
        --out experiments/results/bench_explain_chunking.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
from machine_info import machine  # experiments/machine_info.py (this script's folder)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from relreg.explain import explain, explainer_info  # noqa: E402
from relreg.io import atomic_write  # noqa: E402
from relreg.viz import save_figure  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run(
    model_name: str,
    img_size: int,
    batch: int,
    repeats: int,
    device: torch.device,
    method: str = "chefer",
) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=img_size).to(device).eval()
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    target = torch.arange(batch, device=device) % 10

    def batched() -> None:
        explain(model, x, method, target=target)

    def one_at_a_time() -> None:
        for i in range(batch):
            explain(model, x[i : i + 1], method, target=int(target[i]))

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.gather(1, target[:, None]).sum().backward()

    def batched_dense() -> None:
        explain(model, x, method, target=target, engine="dense")

    # Interleave the cases within each repetition so drifts of the machine hit them alike.
    cases = {"batched": batched}
    if "engine" in explainer_info(method).options:
        cases["batched_dense"] = batched_dense
    cases.update(one_at_a_time=one_at_a_time, forward_backward=forward_backward)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name] += _time(fn, 1, device)
    model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "batched_over_forward_backward": round(med["batched"] / med["forward_backward"], 3),
        "one_at_a_time_over_batched": round(med["one_at_a_time"] / med["batched"], 3),
    }
    if "batched_dense" in med:
        ratios["dense_over_forward_backward"] = round(
            med["batched_dense"] / med["forward_backward"], 3
        )
        ratios["batched_over_dense"] = round(med["batched"] / med["batched_dense"], 3)
    return {
        "model": model_name,
        "method": method,
        "img_size": img_size,
        "batch": batch,
        "repeats": repeats,
        "seconds_per_batch": {k: [round(t, 5) for t in v] for k, v in times.items()},
        "median_s_per_image": {k: round(v / batch, 5) for k, v in med.items()},
        "ratios": ratios,
    }


def plot(result: dict, path: Path) -> None:
    per_image = result["median_s_per_image"]
    method = result.get("method", "chefer")
    labels = {
        "batched": f"{method}, batched (chunked engine)",
        "batched_dense": f"{method}, batched (dense engine)",
        "one_at_a_time": f"{method}, one image at a time",
        "forward_backward": "plain forward+backward",
    }
    fig, ax = plt.subplots(figsize=(6.4, 3.2), constrained_layout=True)
    names = list(per_image)
    vals = [per_image[n] * 1e3 for n in names]
    colors = {"batched": "tab:green", "batched_dense": "tab:olive", "one_at_a_time": "tab:red"}
    bars = ax.barh(
        [labels[n] for n in names], vals, color=[colors.get(n, "tab:gray") for n in names]
    )
    ax.bar_label(bars, fmt="%.1f ms", padding=3)
    ax.set_xlim(0, max(vals) * 1.3)
    ax.set_xlabel("median time per image (ms)")
    m = result["machine"]
    ax.set_title(
        f"{result['model']} @ {result['img_size']}px, batch {result['batch']}, "
        f"{m['device']} ({m['torch_threads']} threads)",
        fontsize=9,
    )
    save_figure(fig, path, dpi=120)


CHUNK_METHODS = {
    "smoothgrad": {"n_samples": 64},
    "integrated_gradients": {"steps": 64},
    "occlusion": {"window": 16, "stride": 8},
    "lime": {"n_samples": 256},
}


def chunk_case(args: argparse.Namespace) -> None:
    """One (method, internal batch size) in this process: prints JSON with seconds and peak RSS."""
    import resource

    import numpy as np

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    size = None if args.chunk_size == 0 else args.chunk_size
    t0 = time.perf_counter()
    maps = explain(
        model,
        x,
        args.chunk_case,
        target=0,
        internal_batch_size=size,
        **CHUNK_METHODS[args.chunk_case],
    )
    seconds = time.perf_counter() - t0
    np.save(args.out, maps.numpy())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1)}))


def chunking(args: argparse.Namespace) -> dict:
    """Every method of CHUNK_METHODS unchunked (0) and at each of ``--chunk-sizes``."""
    import subprocess
    import sys
    import tempfile

    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in CHUNK_METHODS:
            maps = {}
            for size in [0, *args.chunk_sizes]:
                npy = Path(tmp) / f"{method}_{size}.npy"
                cmd = [sys.executable, __file__, "--chunk-case", method, "--chunk-size", str(size)]
                cmd += ["--model", args.model, "--img-size", str(args.img_size)]
                cmd += ["--batch", str(args.batch), "--out", str(npy)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                maps[size] = np.load(npy)
                scale = float(np.abs(maps[0]).max()) or 1.0
                row |= {
                    "method": method,
                    "internal_batch_size": size or None,
                    "max_rel_diff": float(np.abs(maps[size] - maps[0]).max()) / scale,
                }
                rows.append(row)
                print(row)
    return {
        "model": args.model,
        "img_size": args.img_size,
        "batch": args.batch,
        "options": CHUNK_METHODS,
        "rows": rows,
    }


def plot_chunking(result: dict, path: Path) -> None:
    methods = list(result["options"])
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    sizes = sorted({r["internal_batch_size"] or 0 for r in result["rows"]})
    width = 0.8 / len(sizes)
    for j, size in enumerate(sizes):
        peaks = [
            next(
                r["peak_rss_mb"]
                for r in result["rows"]
                if r["method"] == m and (r["internal_batch_size"] or 0) == size
            )
            for m in methods
        ]
        pos = [i + (j - (len(sizes) - 1) / 2) * width for i in range(len(methods))]
        ax.bar(pos, peaks, width, label="unchunked" if size == 0 else f"internal_batch_size={size}")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("process peak RSS (MB)")
    ax.set_title(f"{result['model']} at {result['img_size']} px, batch {result['batch']}")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", default="chefer", help="explainer to time (registry name)")
    parser.add_argument("--quick", action="store_true", help="batch 4, 2 repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_explain.json"))
    parser.add_argument("--chunking", action="store_true", help="internal_batch_size study")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--chunk-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk_case:
        return chunk_case(args)
    if args.chunking:
        result = chunking(args) | {"machine": machine("cpu")}
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
        plot_chunking(result, args.out.with_suffix(".png"))
        return None
    if args.quick:
        args.batch = 4
        args.repeats = 2
    device = torch.device(args.device)
    result = run(args.model, args.img_size, args.batch, args.repeats, device, args.method)
    result["machine"] = machine(device)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("median_s_per_image", "ratios", "machine")}, indent=2))


if __name__ == "__main__":
    main()
