"""The robustness study's run: every benchmark, method and seed, the sweeps and the gains.

:func:`run` is the whole study of ``experiments/robustness_study.py`` (and, without sweeps and the
faithfulness test, one baseline seed of ``experiments/robustness_baselines.py``).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from machine_info import machine  # experiments/machine_info.py (the scripts' folder)
from tqdm import tqdm

from robustness.faithfulness import faithfulness
from robustness.protocol import (
    METRICS,
    build_baseline,
    eval_splits,
    evaluate,
    finetune,
    new_model,
    summarise,
    term_weight,
    with_weight,
)

if TYPE_CHECKING:
    import torch


def run(cfg: dict, seeds: list[int], log: Any, sweeps: bool = True, faithful: bool = True) -> dict:
    """The study: per benchmark, the baseline and every method over ``seeds``, then the sweeps.

    Args:
        cfg: the study's config (``configs/study/robustness.yaml``).
        seeds: fine-tuning seeds.
        log: called with a line per stage and arm.
        sweeps: run the mask-budget and loss-weight sweeps (``cfg["sweeps"]``).
        faithful: run the faithfulness test on each baseline.

    Returns:
        The study's JSON: ``machine``, ``seeds``, ``config``, ``benchmarks`` (per benchmark and
        arm, :func:`robustness.protocol.summarise`), ``baselines`` (the stages' accuracies),
        ``faithfulness``, ``sweeps`` (with ``sweeps``), ``gains`` (each method against the
        control) and ``seconds``.
    """
    start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine("cpu"), "seeds": seeds, "config": cfg}
    result["benchmarks"] = {}
    result["baselines"] = {}
    result["faithfulness"] = {}
    bases: dict[str, dict] = {}
    bar = tqdm(total=_count_runs(cfg, seeds, sweeps), desc="fine-tunes", unit="run", disable=None)
    for kind in cfg["benchmarks"]:
        base, stages = build_baseline(cfg, kind, log)
        bases[kind] = base
        model, arms = _run_benchmark(cfg, kind, base, seeds, log, bar)
        result["baselines"][kind] = stages
        result["benchmarks"][kind] = arms
        if faithful:
            result["faithfulness"][kind] = faithfulness(cfg, model, kind)
    if sweeps:
        result["sweeps"] = _run_sweeps(cfg, result["benchmarks"], bases, seeds, log, bar)
    bar.close()
    result["gains"] = gains(result["benchmarks"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _count_runs(cfg: dict, seeds: list[int], sweeps: bool) -> int:
    """How many fine-tunes :func:`run` makes (the progress bar's total)."""
    total = len(cfg["benchmarks"]) * len(cfg["methods"]) * len(seeds)
    if sweeps:
        sw = cfg["sweeps"]
        total += len(seeds) * (
            len(sw["per_class"]["methods"]) * len(sw["per_class"]["values"])
            + sum(len(w["values"]) for w in sw["weight"].values())
        )
    return total


def _finetunes(
    cfg: dict,
    base: dict,
    kind: str,
    method: dict,
    evals: dict,
    seeds: list[int],
    bar: tqdm,
    **options: Any,
) -> dict:
    """``method`` fine-tuned from ``base`` with every seed (one tick of ``bar`` each), summarised.

    ``options`` go to :func:`robustness.protocol.finetune` (e.g. ``per_class``).
    """
    runs = []
    for seed in seeds:
        runs.append(finetune(cfg, base, kind, method, seed, evals, **options))
        bar.update()
    return summarise(runs)


def _run_benchmark(
    cfg: dict, kind: str, base: dict, seeds: list[int], log: Any, bar: tqdm
) -> tuple[torch.nn.Module, dict]:
    """The baseline and every method over ``seeds`` on one benchmark.

    Returns:
        The baseline model and the summarised arms (``baseline`` and one per method).
    """
    evals = eval_splits(cfg, kind)
    model = new_model(cfg)
    model.load_state_dict(base)
    baseline = evaluate(model, evals, kind, cfg["eval"]["relevance_n"])
    arms = {"baseline": summarise([baseline])}
    for name, method in cfg["methods"].items():
        arms[name] = _finetunes(cfg, base, kind, method, evals, seeds, bar)
        log(
            f"{kind} {name}: "
            + ", ".join(f"{k} {arms[name][k]['mean']:.3f}" for k in METRICS)
            + f"; OOD per seed {arms[name]['ood_acc']['per_seed']}"
        )
    return model, arms


def _run_sweeps(
    cfg: dict, benchmarks: dict, bases: dict, seeds: list[int], log: Any, bar: tqdm
) -> dict:
    """The mask-budget and loss-weight sweeps on ``cfg["sweeps"]["benchmark"]``.

    The arms the study already ran (``benchmarks``) give each sweep its default point.
    """
    sw = cfg["sweeps"]
    kind = sw["benchmark"]
    evals = eval_splits(cfg, kind)
    result = {"benchmark": kind}
    per_class = _per_class_sweep(cfg, benchmarks[kind], bases[kind], kind, evals, seeds, bar)
    result["per_class"] = {"label": "masked images per class", "results": _strip(per_class)}
    weight = _weight_sweep(cfg, benchmarks[kind], bases[kind], kind, evals, seeds, bar)
    result["weight"] = {
        "label": "term weight (classification weight 1)",
        "keys": {name: spec["term"] for name, spec in sw["weight"].items()},
        "results": _strip(weight),
    }
    log(
        "sweeps: "
        + json.dumps(
            {
                k: {
                    m: {x: v["ood_acc"]["mean"] for x, v in pts.items()}
                    for m, pts in result[k]["results"].items()
                }
                for k in ("per_class", "weight")
            }
        )
    )
    return result


def _per_class_sweep(
    cfg: dict, arms: dict, base: dict, kind: str, evals: dict, seeds: list[int], bar: tqdm
) -> dict:
    """Per swept method and number of masked images per class, the summarised fine-tunes."""
    methods = cfg["methods"]
    default = cfg["finetune"]["per_class"]
    points: dict[str, dict] = {}
    for name in cfg["sweeps"]["per_class"]["methods"]:
        points[name] = {str(default): arms[name]}
        for value in cfg["sweeps"]["per_class"]["values"]:
            points[name][str(value)] = _finetunes(
                cfg, base, kind, methods[name], evals, seeds, bar, per_class=value
            )
    return points


def _weight_sweep(
    cfg: dict, arms: dict, base: dict, kind: str, evals: dict, seeds: list[int], bar: tqdm
) -> dict:
    """Per swept method and weight of its term, the summarised fine-tunes."""
    methods = cfg["methods"]
    points: dict[str, dict] = {}
    for name, spec in cfg["sweeps"]["weight"].items():
        term = spec["term"]
        points[name] = {str(term_weight(methods[name], term)): arms[name]}
        for value in spec["values"]:
            method = with_weight(methods[name], term, value)
            points[name][str(value)] = _finetunes(cfg, base, kind, method, evals, seeds, bar)
    return points


def gains(benchmarks: dict) -> dict:
    """Per benchmark (with a ``control`` arm) and method: OOD and ID accuracy minus the control's.

    Args:
        benchmarks: the study's ``benchmarks``: per benchmark and arm, the summarised metrics.

    Returns:
        ``{kind: {method: {"ood_minus_control", "id_minus_control", "ood_gain_every_seed"}}}``;
        the last is whether the method beat the control's OOD accuracy on every seed.
    """
    return {
        kind: {
            name: {
                "ood_minus_control": round(
                    arm["ood_acc"]["mean"] - arms["control"]["ood_acc"]["mean"], 4
                ),
                "id_minus_control": round(
                    arm["id_acc"]["mean"] - arms["control"]["id_acc"]["mean"], 4
                ),
                "ood_gain_every_seed": all(
                    a > b
                    for a, b in zip(
                        arm["ood_acc"]["per_seed"],
                        arms["control"]["ood_acc"]["per_seed"],
                        strict=True,
                    )
                ),
            }
            for name, arm in arms.items()
            if name not in ("control", "baseline")
        }
        for kind, arms in benchmarks.items()
        if "control" in arms
    }


def _strip(points: dict) -> dict:
    return {
        m: {x: {k: v for k, v in s.items() if k in METRICS} for x, s in pts.items()}
        for m, pts in points.items()
    }
