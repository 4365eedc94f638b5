"""Study: model-randomisation sanity checks of every relreg explainer on the demo's model.

Adebayo et al., "Sanity Checks for Saliency Maps" (NeurIPS 2018): randomise the model's weights
from the head down (cascading) and one part at a time (independent), explain the same images with
the same class, and measure how similar each map stays to the original one. A method that
explains the model should lose its similarity once the weights that make the prediction are
random. Runs :func:`relreg.metrics.model_randomisation` on ``--n`` images of a SpuriousShapes split.

    make demo   # trains the models (runs/demo/<stage>/final.ckpt)
    python experiments/sanity_checks.py --checkpoint runs/demo/bias/final.ckpt \\
        --out experiments/results/sanity_checks.json

Writes the JSON (per explainer and order: the steps and the mean similarities per step, the
machine, the time) and a figure next to it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
from machine_info import machine  # experiments/machine_info.py (this script's folder)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from relreg.data import load_split  # noqa: E402
from relreg.explain import list_explainers  # noqa: E402
from relreg.io import atomic_write  # noqa: E402
from relreg.metrics import model_randomisation  # noqa: E402
from relreg.models import model_from_checkpoint  # noqa: E402
from relreg.viz import save_figure  # noqa: E402

FAST = {"lime": {"n_samples": 256}}  # LIME's 1000 default: 4x the time, the same conclusion


def run(args: argparse.Namespace) -> dict:
    model = model_from_checkpoint(args.checkpoint)  # a relreg fit checkpoint (`make demo`)
    data = load_split(f"shapes:{args.split}:{args.n}", model)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    methods = args.methods or list_explainers()
    t0 = time.perf_counter()
    table: dict = {}
    for method in methods:
        table[method] = {}
        for order in ("cascading", "independent"):
            torch.manual_seed(0)
            r = model_randomisation(
                model, images, method, order=order, seed=0, **FAST.get(method, {})
            )
            table[method][order] = r.summary()
            print(method, order, table[method][order]["spearman_abs"])
    result = {
        "checkpoint": str(args.checkpoint),
        "data": f"shapes:{args.split}:{args.n}",
        "protocol": "target: the original model's top-1 class, kept at every step; each randomised "
        "parameter tensor redrawn from a Gaussian with its own mean and std (seed 0); "
        "similarities averaged over the images",
        "options": FAST,
        "table": table,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine("cpu"),
    }
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    _figure(result, methods, args.out.with_suffix(".png"))
    return result


def _figure(result: dict, methods: list[str], path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey=True, constrained_layout=True)
    for col, order in enumerate(("cascading", "independent")):
        for row, key in enumerate(("spearman_abs", "ssim")):
            ax = axes[row, col]
            for method in methods:
                entry = result["table"][method][order]
                ax.plot(range(len(entry["steps"])), entry[key], marker="o", ms=3, label=method)
            steps = result["table"][methods[0]][order]["steps"]
            ax.set_xticks(range(len(steps)), steps, rotation=45, fontsize=7)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{order}: {key}", fontsize=9)
    axes[0, 0].set_ylabel("similarity to the original map")
    axes[1, 0].set_ylabel("similarity to the original map")
    axes[0, 1].legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/demo/bias/final.ckpt"))
    p.add_argument("--split", default="ood", help="SpuriousShapes split")
    p.add_argument("--n", type=int, default=32, help="number of images")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered one")
    p.add_argument("--out", type=Path, default=Path("experiments/results/sanity_checks.json"))
    run(p.parse_args())


if __name__ == "__main__":
    main()
