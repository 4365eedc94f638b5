"""The robustness study's run: every benchmark, method and seed, the sweeps and the gains.

:func:`run` is the whole study of ``experiments/robustness_study.py`` (and, without sweeps and the
faithfulness test, one baseline seed of ``experiments/robustness_baselines.py``).
"""

from __future__ import annotations

import json
import time
from typing import Any

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
    result["benchmarks"], result["baselines"], result["faithfulness"] = {}, {}, {}
    bases: dict[str, dict] = {}
    methods = cfg["methods"]
    total = len(cfg["benchmarks"]) * len(methods) * len(seeds)
    if sweeps:
        sw = cfg["sweeps"]
        total += len(seeds) * (
            len(sw["per_class"]["methods"]) * len(sw["per_class"]["values"])
            + sum(len(w["values"]) for w in sw["weight"].values())
        )
    bar = tqdm(total=total, desc="fine-tunes", unit="run", disable=None)
    for kind in cfg["benchmarks"]:
        base, stages = build_baseline(cfg, kind, log)
        bases[kind] = base
        evals = eval_splits(cfg, kind)
        model = new_model(cfg)
        model.load_state_dict(base)
        baseline = evaluate(model, evals, kind, cfg["eval"]["relevance_n"])
        result["baselines"][kind] = stages
        arms = {"baseline": summarise([baseline])}
        for name, method in methods.items():
            runs = []
            for seed in seeds:
                runs.append(finetune(cfg, base, kind, method, seed, evals))
                bar.update()
            arms[name] = summarise(runs)
            log(
                f"{kind} {name}: "
                + ", ".join(f"{k} {arms[name][k]['mean']:.3f}" for k in METRICS)
                + f"; OOD per seed {arms[name]['ood_acc']['per_seed']}"
            )
        result["benchmarks"][kind] = arms
        if faithful:
            result["faithfulness"][kind] = faithfulness(cfg, model, kind)
    if sweeps:
        sw = cfg["sweeps"]
        kind = sw["benchmark"]
        evals = eval_splits(cfg, kind)
        default = cfg["finetune"]["per_class"]
        result["sweeps"] = {"benchmark": kind}
        per_class: dict[str, dict] = {}
        for name in sw["per_class"]["methods"]:
            per_class[name] = {str(default): result["benchmarks"][kind][name]}
            for value in sw["per_class"]["values"]:
                runs = []
                for seed in seeds:
                    runs.append(
                        finetune(
                            cfg, bases[kind], kind, methods[name], seed, evals, per_class=value
                        )
                    )
                    bar.update()
                per_class[name][str(value)] = summarise(runs)
        result["sweeps"]["per_class"] = {
            "label": "masked images per class",
            "results": _strip(per_class),
        }
        weight: dict[str, dict] = {}
        for name, spec in sw["weight"].items():
            term = spec["term"]
            weight[name] = {str(term_weight(methods[name], term)): result["benchmarks"][kind][name]}
            for value in spec["values"]:
                runs = []
                for seed in seeds:
                    runs.append(
                        finetune(
                            cfg,
                            bases[kind],
                            kind,
                            with_weight(methods[name], term, value),
                            seed,
                            evals,
                        )
                    )
                    bar.update()
                weight[name][str(value)] = summarise(runs)
        result["sweeps"]["weight"] = {
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
                        for m, pts in result["sweeps"][k]["results"].items()
                    }
                    for k in ("per_class", "weight")
                }
            )
        )
    bar.close()
    result["gains"] = gains(result["benchmarks"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


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
