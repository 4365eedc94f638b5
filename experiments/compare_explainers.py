"""Study: every relreg explainer on the CPU benchmark, in the shape of the CVPR 2021 paper's tables.

Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention Visualization" (CVPR 2021)
compare explainers of a ViT by the perturbation test (positive and negative AUC, predicted class,
fractions 0.1 ... 0.9 of the pixels set to black) and the segmentation test (pixel accuracy, mIoU
and mAP of the map thresholded at its mean against the object mask). This script runs both tests,
through :func:`relreg.evaluation.evaluate_models`, for every registered explainer on the masked OOD
split of SpuriousShapes (the background tint points to a wrong class) and a model trained by
``make demo``.

    make demo   # trains the models (runs/demo/<stage>/final.ckpt)
    python experiments/compare_explainers.py --checkpoint runs/demo/bias/final.ckpt \\
        --out experiments/results/compare_explainers.json

Writes the JSON (the table, the ranks, the machine, the time) and a figure next to it. Extra rows
(``VARIANTS``, also accepted by ``--methods``) run a method again with other options:
``lrp:cvpr2021_baseline`` and ``partial_lrp:cvpr2021_baseline`` are ``lrp`` and ``partial_lrp``
with the standard LRP layers the paper computed these two baselines with
(``rules="cvpr2021_baseline"``; the plain rows use relreg's default, conservative rules).
``attnlrp`` is CP-LRP inside attention without the Gamma rule (LXT's ViT setting); its variants
``attnlrp:attnlrp`` (AttnLRP's softmax and uniform rules inside attention), ``attnlrp:gamma=0.25``
and ``attnlrp:attnlrp,gamma=0.25`` add the other attention rule and the Gamma rule on the linear
layers outside attention.

A last column is AttnLRP's own faithfulness measure (Achtibat et al., ICML 2024): the area between
the least- and the most-relevant-first curves of the predicted class's logit as patches are set to
black (:func:`relreg.metrics.functional.flipping_area`, 16 steps; higher is better).
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
from torch.utils.data import DataLoader  # noqa: E402

from relreg.data import load_split  # noqa: E402
from relreg.evaluation import evaluate_models  # noqa: E402
from relreg.explain import explain, list_explainers  # noqa: E402
from relreg.io import atomic_write  # noqa: E402
from relreg.metrics import flipping_area  # noqa: E402
from relreg.models import model_from_checkpoint  # noqa: E402
from relreg.viz import save_figure  # noqa: E402

# (report key, column title, higher is better)
COLUMNS = [
    ("perturbation_positive", "positive AUC", False),
    ("perturbation_negative", "negative AUC", True),
    ("pixel_accuracy", "pixel acc", True),
    ("miou", "mIoU", True),
    ("map", "mAP", True),
    ("flipping_area", "flip area (logit)", True),
]
REPORT_COLUMNS = [key for key, _, _ in COLUMNS if key != "flipping_area"]

# extra rows: {row name: (registered method, its options)}
VARIANTS = {
    "lrp:cvpr2021_baseline": ("lrp", {"rules": "cvpr2021_baseline"}),
    "partial_lrp:cvpr2021_baseline": ("partial_lrp", {"rules": "cvpr2021_baseline"}),
    "attnlrp:attnlrp": ("attnlrp", {"attention": "attnlrp"}),
    "attnlrp:gamma=0.25": ("attnlrp", {"gamma": 0.25}),
    "attnlrp:attnlrp,gamma=0.25": ("attnlrp", {"attention": "attnlrp", "gamma": 0.25}),
}


def _flipping_area(model: torch.nn.Module, data, method: str, options: dict, batch: int) -> float:
    """AttnLRP's faithfulness of ``method``'s maps of the predicted class, mean over ``data``."""
    total, count = 0.0, 0
    for b in DataLoader(data, batch_size=batch):
        images = b["image"]
        maps = explain(model, images, method, **options)
        total += flipping_area(model, images, maps, steps=16).item() * len(images)
        count += len(images)
    return total / count


def _ranks(values: dict[str, float], higher: bool) -> dict[str, int]:
    """Competition ranks (1 = best); methods within 1e-3 of each other share a rank."""

    def better(a: float, b: float) -> bool:
        return a - b > 1e-3 if higher else b - a > 1e-3

    return {m: 1 + sum(better(v, values[m]) for v in values.values()) for m in values}


def run(args: argparse.Namespace) -> dict:
    model = model_from_checkpoint(args.checkpoint)  # a relreg fit checkpoint (`make demo`)
    data = load_split(f"shapes:{args.split}:{args.n}", model)
    methods = args.methods or [*list_explainers(), *VARIANTS]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    plain = [m for m in methods if m not in VARIANTS]

    def evaluate(names: list[str], options: dict | None = None) -> dict:
        return evaluate_models(
            {"model": model},
            data,
            names,
            batch_size=args.batch_size,
            method_options=options,
            progress=not args.quiet,
        )

    report = evaluate(plain) if plain else None
    explainers = dict(report["models"]["model"]["explainers"]) if report else {}
    for row in (m for m in methods if m in VARIANTS):  # a variant: its method, its own options
        method, options = VARIANTS[row]
        report = evaluate([method], {method: options})
        explainers[row] = report["models"]["model"]["explainers"][method]
    table = {
        m: {key: explainers[m][key] for key in REPORT_COLUMNS}
        | {"deletion": explainers[m]["deletion"], "insertion": explainers[m]["insertion"]}
        for m in methods
    }
    for m in methods:
        method, options = VARIANTS.get(m, (m, {}))
        table[m]["flipping_area"] = _flipping_area(model, data, method, options, args.batch_size)
    ranks = {key: _ranks({m: table[m][key] for m in methods}, higher) for key, _, higher in COLUMNS}
    result = {
        "checkpoint": str(args.checkpoint),
        "data": f"shapes:{args.split}:{args.n} (SpuriousShapes, masks of every image)",
        "accuracy": report["models"]["model"]["accuracy"]["data"],
        "protocol": (
            "perturbation: predicted class, pixels set to black, fractions 0.1..0.9, AUC x100; "
            "segmentation: map upsampled, min-max normalised, thresholded at its mean; "
            "flipping_area: predicted class's logit, patches set to black least- and "
            "most-relevant first, area between the curves over 16 steps"
        ),
        "table": table,
        "ranks": ranks,
        "mean_rank": {
            m: round(sum(ranks[k][m] for k, _, _ in COLUMNS) / len(COLUMNS), 2) for m in methods
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine("cpu"),
    }
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    _figure(result, methods, args.out.with_suffix(".png"))
    _print(result, methods)
    return result


def _figure(result: dict, methods: list[str], path: Path) -> None:
    order = sorted(methods, key=lambda m: result["mean_rank"][m])
    figsize = (3.0 * len(COLUMNS), 0.35 * len(order) + 1.6)
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=figsize, sharey=True, constrained_layout=True)
    for ax, (key, title, higher) in zip(axes, COLUMNS, strict=True):
        values = [result["table"][m][key] for m in order]
        scale = 1.0 if key.startswith("perturbation") or key == "flipping_area" else 100.0
        bars = ax.barh(range(len(order)), [v * scale for v in values], color="tab:blue")
        top = max(values) if higher else min(values)
        for bar, v in zip(bars, values, strict=True):
            if abs(v - top) < 1e-3:  # every method tied with the best
                bar.set_color("tab:orange")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_title(f"{title} ({'higher' if higher else 'lower'} is better)", fontsize=8)
        ax.set_yticks(range(len(order)), order, fontsize=8)
        ax.invert_yaxis()
        if key != "flipping_area":
            ax.set_xlim(0, 105)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"Explainers of {result['checkpoint']} on {result['data'].split(' ')[0]} (accuracy "
        f"{result['accuracy']:.2f}): perturbation test (AUC x100), segmentation test (%) and "
        "AttnLRP's flipping area (logit); "
        "orange = best (ties included); rows by mean rank",
        fontsize=9,
    )
    save_figure(fig, path)


def _print(result: dict, methods: list[str]) -> None:
    print(f"{'method':32s}" + "".join(f"{t:>14s}" for _, t, _ in COLUMNS) + f"{'mean rank':>11s}")
    for m in sorted(methods, key=lambda m: result["mean_rank"][m]):
        row = result["table"][m]
        cells = "".join(f"{row[k]:14.3f}" for k, _, _ in COLUMNS)
        print(f"{m:32s}{cells}{result['mean_rank'][m]:11.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/demo/bias/final.ckpt"))
    p.add_argument("--split", default="ood", help="SpuriousShapes split (masks on every image)")
    p.add_argument("--n", type=int, default=256, help="number of images")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="registered explainers and VARIANTS rows; default: all of them",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", type=Path, default=Path("experiments/results/compare_explainers.json"))
    run(p.parse_args())


if __name__ == "__main__":
    main()
