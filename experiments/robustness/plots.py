"""The robustness scripts' figures, drawn from their JSON results (so ``--replot`` redraws them).

- ``robustness_study.py``: :func:`plot_study` (OOD accuracy while fine-tuning, relevance mass
  against OOD accuracy, the faithfulness test, the sweeps);
- ``robustness_baselines.py``: :func:`plot_baselines` (gains per baseline, cue relevance against
  cue reliance, the recovered share while fine-tuning);
- ``robustness_mechanism.py``: :func:`plot_mechanism`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from relreg.viz import save_figure  # noqa: E402
from robustness.mechanism import EXPLAINERS, VARIANTS  # noqa: E402


# ------------------------------------------------------------------------ robustness_study.py
def plot_curves(result: dict, path: Path) -> None:
    """Per benchmark: each arm's mean OOD accuracy (± std over seeds) while fine-tuning."""
    kinds = list(result["benchmarks"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for name, arm in result["benchmarks"][kind].items():
            if "curve" not in arm:
                ax.axhline(arm["ood_acc"]["mean"], color="k", ls=":", label=name)
                continue
            c = arm["curve"]
            mean = c["ood_acc"]["mean"]
            std = c["ood_acc"]["std"]
            line = ax.plot(c["steps"], mean, marker="o", ms=3, label=name)[0]
            ax.fill_between(
                c["steps"],
                [a - s for a, s in zip(mean, std, strict=True)],
                [a + s for a, s in zip(mean, std, strict=True)],
                color=line.get_color(),
                alpha=0.12,
            )
        ax.set(
            title=f"{kind}: OOD accuracy while fine-tuning (mean ± std over seeds)",
            xlabel="fine-tuning step",
            ylabel="OOD accuracy",
            ylim=(0, 1),
        )
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


def plot_mass(result: dict, path: Path) -> None:
    """Top: relevance mass vs OOD accuracy. Bottom: relevance on the cue vs predictions that
    follow it: a faithful map would rank the arms the same on both axes."""
    kinds = list(result["benchmarks"])
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 8), squeeze=False)
    panels = (
        ("relevance_mass", "ood_acc", "relevance mass inside the object", "OOD accuracy"),
        (
            "cue_relevance",
            "follows_cue",
            "relevance on the cue's pixels",
            "predictions following the cue",
        ),
    )
    for row, (x, y, xlabel, ylabel) in enumerate(panels):
        for ax, kind in zip(axes[row], kinds, strict=True):
            for name, arm in result["benchmarks"][kind].items():
                style = {"marker": "*", "s": 90, "color": "k"} if name == "baseline" else {"s": 18}
                ax.scatter(arm[x]["per_seed"], arm[y]["per_seed"], label=name, **style)
            ax.set(
                title=f"{kind} (OOD images, Chefer maps; one point per seed)",
                xlabel=xlabel,
                ylabel=ylabel,
                ylim=(0, 1),
            )
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, path)


def plot_faithfulness(result: dict, path: Path) -> None:
    """Per benchmark: each explainer's relevance share in the background and on the cue, against
    the background's share of the occlusion effect and of the pixels."""
    kinds = list(result["faithfulness"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        f = result["faithfulness"][kind]
        names = list(f["explainers"])
        xs = range(len(names))
        ax.bar(
            [i - 0.2 for i in xs],
            [f["explainers"][n]["relevance_bg_share"] for n in names],
            width=0.4,
            color="tab:blue",
            label="map: relevance share in the background",
        )
        ax.bar(
            [i + 0.2 for i in xs],
            [f["explainers"][n]["relevance_cue_share"] for n in names],
            width=0.4,
            color="tab:orange",
            label="map: relevance share on the cue's pixels",
        )
        ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=7)
        ax.axhline(
            f["effects"]["bg_effect_share"],
            color="tab:red",
            label="prediction: background share of the occlusion effect",
        )
        ax.axhline(
            f["effects"]["bg_area_share"],
            color="grey",
            ls=":",
            label="background share of the pixels",
        )
        ax.set(
            title=f"{kind} baseline, OOD images: occluding the cue "
            f"({f['effects']['cue_area_share']:.1%} of pixels) lowers\n"
            f"p(prediction) by {f['effects']['cue_occlusion_drop']:.2f}; swapping the background "
            f"flips {f['effects']['bg_swap_flip_rate']:.0%} of predictions",
            ylim=(0, 1),
        )
        ax.title.set_fontsize(8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2)
    fig.subplots_adjust(bottom=0.36, wspace=0.15)
    save_figure(fig, path)


def plot_sweeps(result: dict, path: Path) -> None:
    """OOD and ID accuracy against the mask budget and the loss weight (nothing without sweeps)."""
    sweeps = result.get("sweeps") or {}
    names = [k for k in ("per_class", "weight") if k in sweeps]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        keys = sweeps[name].get("keys", {})
        for i, (method, points) in enumerate(sweeps[name]["results"].items()):
            xs = sorted(points, key=float)
            label = f"{method} ({keys[method]})" if method in keys else method
            for metric, style in (("ood_acc", "-"), ("id_acc", ":")):
                mean = [points[x][metric]["mean"] for x in xs]
                std = [points[x][metric]["std"] for x in xs]
                ax.errorbar(
                    [float(x) for x in xs],
                    mean,
                    yerr=std,
                    marker="o" if metric == "ood_acc" else "x",
                    linestyle=style,
                    color=f"C{i}",
                    capsize=3,
                    label=f"{label}: {metric.split('_')[0].upper()}",
                )
        ax.set_xscale("log")
        ticks = sorted({float(x) for pts in sweeps[name]["results"].values() for x in pts})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set(
            title=f"{sweeps['benchmark']}: accuracy vs {sweeps[name]['label']}",
            xlabel=sweeps[name]["label"],
            ylabel="OOD (solid) and ID (dotted) accuracy",
            ylim=(0, 1),
        )
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_study(result: dict, out: Path) -> None:
    """The study's figures, next to its JSON ``out``.

    Args:
        result: the study's JSON (:func:`robustness.study.run`).
        out: the JSON's path; the figures are ``{stem}_ood_vs_steps.png``,
            ``{stem}_mass_vs_ood.png``, ``{stem}_faithfulness.png`` (with the test) and
            ``{stem}_sweeps.png`` (with sweeps).
    """
    stem = out.with_suffix("")
    plot_curves(result, Path(f"{stem}_ood_vs_steps.png"))
    plot_mass(result, Path(f"{stem}_mass_vs_ood.png"))
    if result["faithfulness"]:
        plot_faithfulness(result, Path(f"{stem}_faithfulness.png"))
    plot_sweeps(result, Path(f"{stem}_sweeps.png"))


# -------------------------------------------------------------------- robustness_baselines.py
def plot_gains(result: dict, path: Path) -> None:
    """One column per benchmark: OOD (top) and ID accuracy minus the control's, and (when the
    summary has it) the share of the biasing's OOD loss recovered."""
    summary = result["summary"]
    kinds = list(summary)
    methods = result["methods"]
    rows = [("ood_gain", "OOD acc - control"), ("id_diff", "ID acc - control")]
    if all(summary[k][methods[0]].get("recovery") for k in kinds):
        rows.append(("recovery", "recovered share of the OOD loss"))
    figsize = (5.5 * len(kinds), 3.25 * len(rows))
    fig, axes = plt.subplots(len(rows), len(kinds), figsize=figsize, squeeze=False, sharex=True)
    for j, kind in enumerate(kinds):
        for i, (key, label) in enumerate(rows):
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
                    f"{kind}: one dot per baseline "
                    f"(mean of {len(result['seeds'])} fine-tune seeds)",
                    fontsize=9,
                )
            elif key == "recovery":
                ax.axhline(0.8, color="r", ls=":", lw=1, label="80%")
                ax.legend(fontsize=7)
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
        xs_all = []
        ys_all = []
        for i, name in enumerate(names):
            xs = []
            ys = []
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


def plot_baselines(result: dict, out: Path) -> None:
    """The comparison's figures, next to its JSON ``out``.

    Args:
        result: the comparison's JSON (``robustness_baselines.py``).
        out: the JSON's path; the figures are ``{stem}.png`` (:func:`plot_gains`) and
            ``{stem}_cue.png`` (:func:`plot_cue`).
    """
    plot_gains(result, out.with_suffix(".png"))
    plot_cue(result, Path(f"{out.with_suffix('')}_cue.png"))
    if any(r.get("recovery_curve") for rows in result["summary"].values() for r in rows.values()):
        plot_recovery(result, Path(f"{out.with_suffix('')}_recovery.png"))


def plot_recovery(result: dict, path: Path) -> None:
    """Per benchmark: each method's recovered share of the OOD loss at each fine-tuning step (thin:
    one line per baseline; thick: their mean), against the control's final accuracy."""
    summary = result["summary"]
    kinds = list(summary)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for x, name in enumerate(result["methods"]):
            curve = summary[kind][name].get("recovery_curve")
            if not curve:
                continue
            for row in curve["per_baseline"]:
                ax.plot(curve["steps"], row, color=f"C{x}", lw=0.7, alpha=0.4)
            ax.plot(
                curve["steps"], curve["mean"], color=f"C{x}", lw=2.2, marker="o", ms=3, label=name
            )
        ax.axhline(0.8, color="r", ls=":", lw=1, label="80%")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(
            title=f"{kind}: share of the OOD loss recovered over the control "
            "(one thin line per baseline)",
            xlabel="fine-tuning step",
            ylabel="(OOD(step) - OOD control) / (OOD pretrained - OOD control)",
        )
        ax.title.set_fontsize(9)
        ax.yaxis.label.set_fontsize(8)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


# -------------------------------------------------------------------- robustness_mechanism.py
def plot_mechanism(result: dict, path: Path) -> None:
    """Per model: what the prediction reads, where the maps (and the rule variants) put
    relevance, and which route swapping the background in takes."""
    models = list(result["models"])
    rows = result["models"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.2))
    ax = axes[0]
    reads = {
        "follows cue (full image)": [
            rows[m]["effects"]["reads"]["full"]["follows_cue"] for m in models
        ],
        "follows cue (object patches only)": [
            rows[m]["effects"]["reads"]["object_patches_only"]["follows_cue"] for m in models
        ],
        "background swap flips": [rows[m]["effects"]["bg_swap_flip_rate"] for m in models],
        "background share of occlusion effect": [
            rows[m]["effects"]["bg_effect_share"] for m in models
        ],
    }
    width = 0.8 / len(reads)
    for i, (label, values) in enumerate(reads.items()):
        ax.bar([j + i * width for j in range(len(models))], values, width, label=label)
    ax.axhline(0.25, color="k", ls=":", lw=1, label="chance of following the cue (1/4)")
    ax.set(title="what the prediction reads (OOD images)", ylim=(0, 1))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    shares = {f"{n} (rule)": [rows[m]["rule_variants"][n] for m in models] for n in VARIANTS}
    shares.update(
        {
            n: [rows[m]["explainers"][n]["relevance_cue_share"] for m in models]
            for n in EXPLAINERS
            if n != "chefer"
        }
    )
    width = 0.8 / len(shares)
    for i, (label, values) in enumerate(shares.items()):
        ax.bar([j + i * width for j in range(len(models))], values, width, label=label)
    ax.set(title="where the maps put relevance: share on the cue's pixels", ylim=(0, 1))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    routes = ["counterfactual", "keys_and_values", "keys", "values"]
    width = 0.8 / len(routes)
    for i, route in enumerate(routes):
        values = [rows[m]["patching"][route]["follows_new_cue"] for m in models]
        label = "whole image swapped" if route == "counterfactual" else f"background sends {route}"
        ax.bar([j + i * width for j in range(len(models))], values, width, label=label)
    ax.set(title="background swapped in one route: predictions following the new cue", ylim=(0, 1))
    ax.title.set_fontsize(9)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"{result['benchmark']}, baseline seed {result['baseline_seed']}, fine-tune seed "
        f"{result['seed']}",
        fontsize=10,
    )
    save_figure(fig, path)
