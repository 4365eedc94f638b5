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
baseline), ``*_cue.png`` (relevance on the cue against reliance on it, every fine-tuned model) and
``*_recovery.png`` (the recovered share while fine-tuning; ``--steps`` for a longer fine-tune;
``--no-source-task`` pre-trains on the task's own classes instead of a config's source task).
About 7 minutes per baseline seed with the default methods on 2 CPU cores (1320 s for three).

The pieces live in the package ``experiments/robustness/``: ``robustness.baselines`` (study reuse,
summaries), ``robustness.study`` (one baseline seed's run) and ``robustness.plots``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from machine_info import machine  # experiments/machine_info.py (this script's folder)
from robustness.baselines import compact, study_matches, summarise_gains
from robustness.plots import plot_baselines
from robustness.protocol import (
    DEFAULT_CONFIG,
    check_methods,
    drop_source_task,
    load_config,
    shrink,
)
from robustness.study import run

from relreg.io import atomic_write

DEFAULT_METHODS = ["relreg", "relreg_label", "relreg_teacher", "energy", "counterfactual"]


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    if args.replot:
        _replot(args.out)
        return
    methods = [m for m in args.methods if m != "control"]
    cfg = _config(parser, args, methods)
    study = json.loads(args.from_study.read_text()) if args.from_study else None
    start = time.perf_counter()
    per_baseline = _run_baselines(cfg, args, study)
    out = {
        "machine": machine("cpu"),
        "config": cfg,
        "seeds": args.seeds,
        "baseline_seeds": args.baseline_seeds,
        "methods": methods,
        "summary": summarise_gains(per_baseline, methods),
        "per_baseline": per_baseline,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1)))
    plot_baselines(out, args.out)
    _print_summary(out["summary"], methods)
    print(f"wrote {args.out} in {out['seconds']:.0f} s")


def _parser() -> argparse.ArgumentParser:
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
        "--benchmarks",
        nargs="+",
        choices=["tint", "marker", "scenes"],
        help="default: the config's",
    )
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the config's)")
    parser.add_argument(
        "--no-source-task",
        action="store_true",
        help="pre-train on the task's own classes instead of the config's source task",
    )
    parser.add_argument(
        "--from-study", type=Path, help="a robustness_study.py JSON to reuse for its baseline seed"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--replot", action="store_true", help="only recompute the summary and redraw the figures"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    return parser


def _replot(path: Path) -> None:
    """Recompute the summary from the stored per-baseline results and redraw the figures."""
    out = json.loads(path.read_text())
    out["summary"] = summarise_gains(out["per_baseline"], out["methods"])
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1)))
    plot_baselines(out, path)


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace, methods: list[str]) -> dict:
    """The study's config with the command line's methods, benchmarks and steps."""
    cfg = load_config(parser, args)
    if args.no_source_task:
        drop_source_task(parser, cfg, args.config)
    for name, spec in args.define:
        try:
            cfg["methods"][name] = json.loads(spec)
        except json.JSONDecodeError as err:
            parser.error(f"--define {name}: expected a JSON object, but got {spec!r} ({err})")
    check_methods(parser, cfg, args.methods)
    cfg["methods"] = {k: v for k, v in cfg["methods"].items() if k in {"control", *methods}}
    if args.benchmarks:
        cfg["benchmarks"] = args.benchmarks
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps: expected a positive number of steps, but got {args.steps}")
        cfg["finetune"]["steps"] = args.steps
    if args.quick:
        shrink(cfg)
    return cfg


def _run_baselines(cfg: dict, args: argparse.Namespace, study: dict | None) -> dict[str, dict]:
    """Per baseline seed, the compacted study run (reused from ``study`` where it matches)."""
    per_baseline: dict[str, dict] = {}
    for b in args.baseline_seeds:
        if study is not None and study_matches(study, cfg, args.seeds, b):
            print(f"baseline seed {b}: from {args.from_study}", flush=True)
            per_baseline[str(b)] = compact(study, cfg["benchmarks"])
            continue
        print(f"baseline seed {b}", flush=True)
        result = run(
            {**cfg, "baseline_seed": b},
            args.seeds,
            lambda s: print(s, flush=True),
            sweeps=False,
            faithful=False,
        )
        per_baseline[str(b)] = compact(result, cfg["benchmarks"])
    return per_baseline


def _print_summary(summary: dict, methods: list[str]) -> None:
    for kind, rows in summary.items():
        for name in methods:
            r = rows[name]
            print(
                f"{kind} {name}: OOD - control {r['ood_gain']['mean']:+.3f} "
                f"{r['ood_gain']['per_baseline']}, ID - control {r['id_diff']['mean']:+.3f}"
            )


if __name__ == "__main__":
    main()
