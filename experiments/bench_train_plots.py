"""Figures of ``experiments/bench_train.py``: cases' ratios and phases, token sweep, families."""

from __future__ import annotations

from pathlib import Path

PHASES = (
    "forward",
    "input_gradient_backward",
    "relevance_forward",
    "relevance_backward",
    "final_backward",
    "other",
)


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(result: dict, what: str) -> str:
    m = result["machine"]
    return (
        f"{what}, batch {result['batch']}, {m['device']} {m['device_name']} "
        f"({m['torch_threads']} threads)"
    )


def plot(result: dict, path: Path) -> None:
    plt = _pyplot()
    models = list(result["models"])
    cases = list(result["models"][models[0]]["cases"])
    fig, axes = plt.subplots(1, 4, figsize=(19, 3.8), constrained_layout=True)
    width = 0.8 / len(models)
    for j, key in enumerate(("time_ratio", "memory_ratio", "graph_ratio")):
        ax = axes[j]
        for i, m in enumerate(models):
            ratios = [result["models"][m]["ratios"][c][key] for c in cases]
            bars = ax.bar([k + i * width for k in range(len(cases))], ratios, width, label=m)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.set_xticks(
            [k + width * (len(models) - 1) / 2 for k in range(len(cases))],
            cases,
            fontsize=7,
            rotation=15,
        )
        names = {"time_ratio": "step time", "memory_ratio": "step peak memory"}
        ax.set_ylabel(names.get(key, "autograd graph memory") + " / plain")
        ax.legend(fontsize=7)
    ax = axes[3]  # phases of the main model's steps, as fractions of a plain step
    main = result["models"][models[0]]["ratios"]
    bottom = [0.0] * len(cases)
    for phase in PHASES:
        vals = [main[c]["phases_over_plain_step"][phase] for c in cases]
        ax.bar(range(len(cases)), vals, 0.6, bottom=bottom, label=phase.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(cases)), cases, fontsize=7, rotation=15)
    ax.set_ylabel(f"phase time / plain step ({models[0]})")
    ax.legend(fontsize=6)
    fig.suptitle(_title(result, "training step"), fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(result: dict, path: Path) -> None:
    plt = _pyplot()
    tokens = [result["sweep"][m]["tokens"] for m in result["sweep"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True)
    colors = {"plain": "gray", "first_order_dense": "tab:red", "first_order": "tab:green"}
    for case in next(iter(result["sweep"].values()))["cases"]:
        color = colors.get(case)
        rows = [result["sweep"][m]["cases"][case] for m in result["sweep"]]
        extra = [
            r["peak_mb"] - p["cases"]["plain"]["peak_mb"]
            for r, p in zip(rows, result["sweep"].values(), strict=True)
        ]
        axes[0].plot(tokens, [r["peak_mb"] for r in rows], "o-", color=color, label=case)
        graph = [
            r["graph_mb"] - p["cases"]["plain"]["graph_mb"]
            for r, p in zip(rows, result["sweep"].values(), strict=True)
        ]
        axes[1].plot(tokens, extra, "o-", color=color, label=f"{case}: process peak")
        axes[1].plot(tokens, graph, "s--", color=color, label=f"{case}: autograd graph")
        ratios = [result["sweep"][m]["ratios"][case]["time_ratio"] for m in result["sweep"]]
        axes[2].plot(tokens, ratios, "o-", color=color, label=case)
    labels = ("process peak memory (MB)", "memory over plain (MB)", "step time / plain")
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xlabel("tokens N (" + ", ".join(f"{m} px" for m in result["sweep"]) + ")")
        ax.set_ylabel(label)
        ax.set_xticks(tokens)
        ax.legend(fontsize=7)
    fig.suptitle(_title(result, "memory and time versus tokens"), fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_families(result: dict, path: Path) -> None:
    """``--families``: the relevance steps' memory ratios per family (process RSS and C heap, with
    the target) and their time ratios."""
    plt = _pyplot()
    rows = result["families"]
    names = [f"{k}\n{r['img_size']} px, N={r['tokens']}" for k, r in rows.items()]
    target = result["memory_ratio_target"]
    cases = [c for c in next(iter(rows.values()))["ratios"] if c != "plain"]
    series = [(c, m) for c in cases for m in ("memory_ratio", "heap_memory_ratio")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2), constrained_layout=True)
    width = 0.8 / len(series)
    for i, (case, measure) in enumerate(series):
        values = [r["ratios"][case].get(measure) or 0.0 for r in rows.values()]
        label = f"{case}, {'RSS' if measure == 'memory_ratio' else 'heap'}"
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        bars = axes[0].bar(xs, values, width, label=label, hatch="//" if "heap" in measure else "")
        axes[0].bar_label(bars, fmt="%.2f", fontsize=6)
    axes[0].axhline(target, color="black", ls="--", lw=1, label=f"target {target}x")
    axes[0].set_ylabel("step peak memory, relevance step / plain step")
    width = 0.8 / len(cases)
    for i, case in enumerate(cases):
        xs = [j + (i - (len(cases) - 1) / 2) * width for j in range(len(rows))]
        times = [r["ratios"][case]["time_ratio"] for r in rows.values()]
        bars = axes[1].bar(xs, times, width, label=case)
        axes[1].bar_label(bars, fmt="%.2f", fontsize=7)
    axes[1].set_ylabel("median step time, relevance step / plain step")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.axhline(1.0, color="gray", ls=":", lw=0.8)
        ax.set_xticks(range(len(rows)), names, fontsize=7)
    axes[0].legend(fontsize=8)
    ckpt = ", gradient checkpointing" if result["grad_checkpointing"] else ""
    what = f"chunked relevance step against plain step, every ViT family{ckpt}"
    fig.suptitle(_title(result, what), fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
