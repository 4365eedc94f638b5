"""The study's main comparison over several baselines: reusing a study run, and the summaries.

Used by ``experiments/robustness_baselines.py``: each baseline seed is a study run without sweeps
(:func:`robustness.study.run`), kept as :func:`compact`; :func:`summarise_gains` collects each
method's differences to the control over the baselines.
"""

from __future__ import annotations

import statistics
from typing import Any

# the sections of the protocol that must match for a study run to stand in for a baseline seed
PROTOCOL = ("num_classes", "image_size", "model", "scenes", "pretrain", "bias", "finetune", "eval")


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.pstdev(values), 4),
        "per_baseline": [round(v, 4) for v in values],
    }


def study_matches(study: dict, cfg: dict, seeds: list[int], baseline_seed: int) -> bool:
    """Whether a study run can stand in for ``baseline_seed``.

    Args:
        study: a ``robustness_study.py`` JSON.
        cfg: the comparison's config.
        seeds: the comparison's fine-tuning seeds.
        baseline_seed: the baseline seed to fill.

    Returns:
        True when the study ran that baseline seed with the same fine-tuning seeds and
        :data:`PROTOCOL` sections, on every benchmark and method of ``cfg``.
    """
    return (
        study["config"].get("baseline_seed", 0) == baseline_seed
        and study["seeds"] == seeds
        and all(study["config"].get(k) == cfg.get(k) for k in PROTOCOL)
        and set(cfg["benchmarks"]) <= set(study["benchmarks"])
        and all(set(cfg["methods"]) <= set(study["benchmarks"][k]) for k in cfg["benchmarks"])
    )


def compact(result: dict, benchmarks: list[str] | None = None) -> dict:
    """A study result without sweeps and timings: the baselines, the arms' metrics and OOD curves
    and the gains, for ``benchmarks`` only (default: all of the result's), so that a study run
    that covered more benchmarks than the comparison can stand in for one of its baselines."""
    kinds = list(result["benchmarks"]) if benchmarks is None else list(benchmarks)
    return {
        "baselines": {kind: result["baselines"][kind] for kind in kinds},
        "benchmarks": {
            kind: {
                name: {k: v for k, v in arm.items() if k != "seconds"}
                for name, arm in result["benchmarks"][kind].items()
            }
            for kind in kinds
        },
        "gains": {kind: result["gains"][kind] for kind in kinds},
    }


def _recovery_curve(arms: list[dict], name: str, before: list[float]) -> dict | None:
    """The recovered share at each evaluated step of ``name``'s mean OOD curve, per baseline (None
    without curves, or where biasing after the control cost under 1 point)."""
    if not all("curve" in a[name] for a in arms):
        return None
    rows = []
    for arm, pre in zip(arms, before, strict=True):
        control = arm["control"]["ood_acc"]["mean"]
        if pre - control <= 0.01:
            return None
        rows.append(
            [
                round((v - control) / (pre - control), 4)
                for v in arm[name]["curve"]["ood_acc"]["mean"]
            ]
        )
    return {
        "steps": arms[0][name]["curve"]["steps"],
        "mean": [round(statistics.fmean(col), 4) for col in zip(*rows, strict=True)],
        "per_baseline": rows,
    }


def _worst_group(arms: list[dict], name: str) -> dict | None:
    """The arm's worst-group accuracy on the unbiased split over the baselines (None for runs
    made before the study measured it)."""
    if not all("worst_group_acc" in a[name] for a in arms):
        return None
    return _stats([a[name]["worst_group_acc"]["mean"] for a in arms])


def summarise_gains(per_baseline: dict[str, dict], methods: list[str]) -> dict:
    """Per benchmark and method: the OOD and ID differences to the control, over the baselines.

    Args:
        per_baseline: ``{baseline seed: compact(study result)}``.
        methods: the methods to summarise (not the control).

    Returns:
        ``{kind: {method: {"ood_gain", "id_diff", "unbiased_diff", "recovery": {"mean", "std",
        "per_baseline"}, "gain_every_seed": [...], "relevance": {metric: mean over baselines}},
        "baseline_ood_acc": {...}, "pretrained_ood_acc": {...}}}`` (std over the baselines,
        population). ``recovery`` is the share of the OOD accuracy that biasing destroyed which
        the method wins back over the control, ``(OOD_method - OOD_control) / (OOD_pretrained -
        OOD_control)`` per baseline (OOD_pretrained: the model before the biasing stage). When
        the arms have OOD curves, ``recovery_curve`` is the same share at each evaluated
        fine-tuning step, against the control's final accuracy: ``{"steps", "mean",
        "per_baseline": [[...]]}``.
    """
    kinds = next(iter(per_baseline.values()))["benchmarks"]
    summary: dict[str, dict] = {}
    for kind in kinds:
        summary[kind] = {}
        arms = [per_baseline[b]["benchmarks"][kind] for b in per_baseline]
        before = [per_baseline[b]["baselines"][kind]["pretrain"]["ood_acc"] for b in per_baseline]

        def mean(arm: dict, key: str) -> float:
            return arm[key]["mean"]

        for name in methods:
            gains = [per_baseline[b]["gains"][kind][name] for b in per_baseline]
            lost = [p - mean(a["control"], "ood_acc") for a, p in zip(arms, before, strict=True)]
            recovery = [  # undefined where biasing (after the control) cost under 1 point
                (mean(a[name], "ood_acc") - mean(a["control"], "ood_acc")) / d
                for a, d in zip(arms, lost, strict=True)
                if d > 0.01
            ]
            summary[kind][name] = {
                "ood_gain": _stats([g["ood_minus_control"] for g in gains]),
                "id_diff": _stats([g["id_minus_control"] for g in gains]),
                "unbiased_diff": _stats(
                    [
                        mean(a[name], "unbiased_acc") - mean(a["control"], "unbiased_acc")
                        for a in arms
                    ]
                ),
                "recovery": _stats(recovery) if recovery else None,
                "worst_group_acc": _worst_group(arms, name),
                "recovery_curve": _recovery_curve(arms, name, before),
                "gain_every_seed": [g["ood_gain_every_seed"] for g in gains],
                "relevance": {
                    key: round(statistics.fmean(mean(a[name], key) for a in arms), 4)
                    for key in ("relevance_mass", "cue_relevance", "follows_cue")
                },
            }
        summary[kind]["control"] = {
            "relevance": {
                key: round(statistics.fmean(mean(a["control"], key) for a in arms), 4)
                for key in ("relevance_mass", "cue_relevance", "follows_cue")
            },
            "ood_acc": _stats([mean(a["control"], "ood_acc") for a in arms]),
            "id_acc": _stats([mean(a["control"], "id_acc") for a in arms]),
            "unbiased_acc": _stats([mean(a["control"], "unbiased_acc") for a in arms]),
            "worst_group_acc": _worst_group(arms, "control"),
        }
        summary[kind]["pretrained_ood_acc"] = _stats(before)
        summary[kind]["baseline_ood_acc"] = _stats(
            [per_baseline[b]["baselines"][kind]["bias"]["ood_acc"] for b in per_baseline]
        )
    return summary
