"""Study: do the robustness study's gains survive a different baseline?

The robustness study (``experiments/robustness_study.py``) fine-tunes *one* baseline per benchmark
over several fine-tuning seeds, so its spread says nothing about how much the result depends on the
baseline itself. This script repeats the study's main comparison (no sweeps, no faithfulness test)
for several baseline seeds (the initialisation and batch order of the pretraining and biasing
stages; the data are the same) and reports, per benchmark and method, the OOD and ID accuracy
differences to the CE control of the same baseline.

    python experiments/robustness_baselines.py --baseline-seeds 1 2 3 \\
        --from-study experiments/results/robustness_study.json \\
        --out experiments/results/robustness_baselines.json

``--from-study`` reuses the study's own run as baseline seed 0 when its protocol matches. Writes
the JSON (``{"summary": {KIND: {METHOD: {"ood_gain": {"mean", "std", "per_baseline"}, "id_diff":
..., "gain_every_seed": [...]}}}, "per_baseline": {...}}``), ``*.png`` next to it (one dot per
baseline) and ``*_cue.png`` (relevance on the cue against reliance on it, every fine-tuned model). About 7 minutes per baseline seed with the default methods on 2 CPU cores (1320 s for three).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib
from machine_info import machine  # experiments/machine_info.py (this script's folder)
from robustness_study import DEFAULT_CONFIG, check_methods, load_config, run, shrink

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from relreg.io import atomic_write  # noqa: E402
from relreg.viz import save_figure  # noqa: E402

# the sections of the protocol that must match for a study run to stand in for a baseline seed
PROTOCOL = ("num_classes", "image_size", "model", "pretrain", "bias", "finetune", "eval")
DEFAULT_METHODS = ["relreg", "relreg_label", "relreg_teacher", "energy", "counterfactual"]


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.pstdev(values), 4),
        "per_baseline": [round(v, 4) for v in values],
    }


def compact(result: dict) -> dict:
    """A study result without curves and sweeps: the baselines, the arms' metrics and the gains."""
    return {
        "baselines": result["baselines"],
        "benchmarks": {
            kind: {
                name: {k: v for k, v in arm.items() if k not in ("curve", "seconds")}
                for name, arm in arms.items()
            }
            for kind, arms in result["benchmarks"].items()
        },
        "gains": result["gains"],
    }


def summarise(per_baseline: dict[str, dict], methods: list[str]) -> dict:
    """Per benchmark and method: the OOD and ID differences to the control, over the baselines."""
    kinds = next(iter(per_baseline.values()))["benchmarks"]
    summary: dict[str, dict] = {}
    for kind in kinds:
        summary[kind] = {}
        for name in methods:
            gains = [per_baseline[b]["gains"][kind][name] for b in per_baseline]
            summary[kind][name] = {
                "ood_gain": _stats([g["ood_minus_control"] for g in gains]),
                "id_diff": _stats([g["id_minus_control"] for g in gains]),
                "gain_every_seed": [g["ood_gain_every_seed"] for g in gains],
            }
        summary[kind]["baseline_ood_acc"] = _stats(
            [per_baseline[b]["baselines"][kind]["bias"]["ood_acc"] for b in per_baseline]
        )
    return summary


def plot(result: dict, path: Path) -> None:
    """One column per benchmark: OOD (top) and ID (bottom) accuracy minus the control's."""
    summary = result["summary"]
    kinds = list(summary)
    methods = result["methods"]
    fig, axes = plt.subplots(
        2, len(kinds), figsize=(5.5 * len(kinds), 6.5), squeeze=False, sharex=True
    )
    for j, kind in enumerate(kinds):
        for i, (key, label) in enumerate(
            (("ood_gain", "OOD acc - control"), ("id_diff", "ID acc - control"))
        ):
            ax = axes[i][j]
            for x, name in enumerate(methods):
                stats = summary[kind][name][key]
                ax.bar(x, stats["mean"], color=f"C{x}", alpha=0.35)
                ax.scatter(
                    [x] * len(stats["per_baseline"]),
                    stats["per_baseline"],
                    color=f"C{x}",
                    edgecolor="k",
                    zorder=3,
                )
            ax.axhline(0, color="k", lw=0.8)
            if key == "ood_gain":
                ax.axhline(0.15, color="r", ls=":", lw=1, label="+15 points")
                ax.legend(fontsize=7)
                ax.set_title(
                    f"{kind}: one dot per baseline (mean of {len(result['seeds'])} fine-tune seeds)",
                    fontsize=9,
                )
            else:
                ax.axhline(-0.02, color="r", ls=":", lw=1)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, axis="y")
            ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
    save_figure(fig, path)


def _pearson(xs: list[float], ys: list[float]) -> float:
    constant = len(set(xs)) < 2 or len(set(ys)) < 2
    return float("nan") if len(xs) < 3 or constant else statistics.correlation(xs, ys)


def plot_cue(result: dict, path: Path) -> None:
    """Per benchmark: relevance on the cue against how often the prediction follows it.

    One point per fine-tuned model (every baseline, method and seed), on OOD images; the title
    gives Pearson's r over all of them. A map that is faithful to the cue's use puts the points on
    a rising line.
    """
    per_baseline = result["per_baseline"]
    kinds = list(result["summary"])
    names = ["control", *result["methods"]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        xs_all, ys_all = [], []
        for i, name in enumerate(names):
            xs, ys = [], []
            for one in per_baseline.values():
                arm = one["benchmarks"][kind][name]
                xs += arm["cue_relevance"]["per_seed"]
                ys += arm["follows_cue"]["per_seed"]
            ax.scatter(xs, ys, s=14, color=f"C{i}", label=name)
            xs_all += xs
            ys_all += ys
        ax.set(
            title=f"{kind}: {len(xs_all)} fine-tuned models, Pearson r = "
            f"{_pearson(xs_all, ys_all):.2f}",
            xlabel="Chefer relevance on the cue's pixels (OOD images)",
            ylabel="OOD predictions that follow the cue",
            ylim=(0, 1),
        )
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper right")
    save_figure(fig, path)


def plot_all(result: dict, out: Path) -> None:
    plot(result, out.with_suffix(".png"))
    plot_cue(result, Path(f"{out.with_suffix('')}_cue.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "robustness_baselines.json"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--baseline-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tune seeds")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument(
        "--define",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "JSON"),
        help="add a method to the config's: RelRegModule arguments as JSON (repeatable)",
    )
    parser.add_argument(
        "--benchmarks", nargs="+", choices=["tint", "marker"], help="default: the config's"
    )
    parser.add_argument(
        "--from-study", type=Path, help="a robustness_study.py JSON to reuse for its baseline seed"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure of --out")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args()
    if args.replot:
        plot_all(json.loads(args.out.read_text()), args.out)
        return
    cfg = load_config(parser, args)
    for name, spec in args.define:
        try:
            cfg["methods"][name] = json.loads(spec)
        except json.JSONDecodeError as err:
            parser.error(f"--define {name}: expected a JSON object, but got {spec!r} ({err})")
    check_methods(parser, cfg, args.methods)
    methods = [m for m in args.methods if m != "control"]
    cfg["methods"] = {k: v for k, v in cfg["methods"].items() if k in {"control", *methods}}
    if args.benchmarks:
        cfg["benchmarks"] = args.benchmarks
    if args.quick:
        shrink(cfg)
    study = json.loads(args.from_study.read_text()) if args.from_study else None
    start = time.perf_counter()
    per_baseline: dict[str, dict] = {}
    for b in args.baseline_seeds:
        if (
            study is not None
            and study["config"].get("baseline_seed", 0) == b
            and study["seeds"] == args.seeds
            and all(study["config"][k] == cfg[k] for k in PROTOCOL)
            and set(cfg["benchmarks"]) <= set(study["benchmarks"])
            and all(set(cfg["methods"]) <= set(study["benchmarks"][k]) for k in cfg["benchmarks"])
        ):
            print(f"baseline seed {b}: from {args.from_study}", flush=True)
            per_baseline[str(b)] = compact(study)
            continue
        print(f"baseline seed {b}", flush=True)
        result = run(
            {**cfg, "baseline_seed": b},
            args.seeds,
            lambda s: print(s, flush=True),
            sweeps=False,
            faithful=False,
        )
        per_baseline[str(b)] = compact(result)
    out = {
        "machine": machine("cpu"),
        "config": cfg,
        "seeds": args.seeds,
        "baseline_seeds": args.baseline_seeds,
        "methods": methods,
        "summary": summarise(per_baseline, methods),
        "per_baseline": per_baseline,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1)))
    plot_all(out, args.out)
    for kind, rows in out["summary"].items():
        for name in methods:
            r = rows[name]
            print(
                f"{kind} {name}: OOD - control {r['ood_gain']['mean']:+.3f} "
                f"{r['ood_gain']['per_baseline']}, ID - control {r['id_diff']['mean']:+.3f}"
            )
    print(f"wrote {args.out} in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
