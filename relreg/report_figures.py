"""The figures of ``relreg evaluate``'s report: heatmap grids, perturbation curves, accuracy bars,
before/after comparisons and the model-randomisation sanity checks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from relreg.explain import explain, to_pixels
from relreg.metrics import report_keys
from relreg.viz import explanation_grid, save_figure

__all__ = ["displayable", "heatmap_grid_maps", "write_figures", "write_sanity"]


def displayable(images: Tensor, dataset: Dataset, model: nn.Module) -> Tensor:
    """``(B, 3, H, W)`` images in [0, 1]: the normalisation undone with the dataset's own
    preprocessing, else the model's timm data config (what :func:`relreg.data.load_split` used)."""
    import timm.data

    pre = getattr(dataset, "preprocessing", None)
    config = pre.describe() if pre else timm.data.resolve_model_data_config(model)
    mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (images * std + mean).clamp(0, 1)


def heatmap_grid_maps(
    models: Mapping[str, nn.Module],
    images: Tensor,
    methods: Sequence[str],
    method_options: Mapping[str, Mapping[str, object]] | None = None,
) -> dict[str, Tensor]:
    """``{"<label>/<method>": (B, H, W)}`` min-max normalised pixel maps for a heatmap grid."""
    options = method_options or {}
    out = {}
    for label, model in models.items():
        device = next(model.parameters()).device
        for name in methods:
            maps = explain(model.eval(), images.to(device), name, **options.get(name, {}))
            key = name if len(models) == 1 else f"{label}/{name}"
            out[key] = to_pixels(maps.detach(), size=images.shape[-2:]).cpu()
    return out


def write_figures(
    report: Mapping,
    out: str | Path,
    shown: Tensor | None = None,
    heatmaps: Mapping[str, Tensor] | None = None,
    row_titles: Sequence[str] | None = None,
) -> list[Path]:
    """Figures of a report from :func:`evaluate_models`.

    Writes ``perturbation_curves.png`` (accuracy vs removed fraction, positive and negative, one
    panel per method, one colour per model), ``ood_accuracy.png`` (accuracy per split and model),
    ``before_after.png`` (every metric per method, one bar per model; with two or more models)
    and ``heatmaps.png`` (when ``shown (B, 3, H, W)`` images in [0, 1] and ``heatmaps`` are given).

    Returns:
        The paths written.
    """
    import matplotlib.pyplot as plt

    out = Path(out)
    labels = list(report["models"])
    methods = list(report["methods"])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    fig, axes = plt.subplots(
        1, len(methods), figsize=(3.3 * len(methods), 3.2), squeeze=False, constrained_layout=True
    )
    x = report["fractions"]
    for ax, method in zip(axes[0], methods, strict=True):
        for i, label in enumerate(labels):
            r = report["models"][label]["explainers"][method]
            c = colours[i % len(colours)]
            ax.plot(x, r["curves"]["positive"], "-o", ms=3, color=c,
                    label=f"{label} pos {r['perturbation_positive']:.1f}")  # fmt: skip
            ax.plot(x, r["curves"]["negative"], "--s", ms=3, color=c,
                    label=f"{label} neg {r['perturbation_negative']:.1f}")  # fmt: skip
        ax.set_title(method)
        ax.set_xlabel(
            "fraction of pixels removed"
            if report["unit"] == "pixel"
            else "fraction of patches removed"
        )
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="AUC x100", title_fontsize=7)
    axes[0, 0].set_ylabel(f"top-1 accuracy ({report['target']} class)")
    fig.suptitle(
        "Perturbation test (positive: solid, lower is better; negative: dashed, higher is better)",
        fontsize=9,
    )
    written.append(save_figure(fig, out / "perturbation_curves.png"))

    splits = list(report["models"][labels[0]]["accuracy"])
    fig, ax = plt.subplots(
        figsize=(1.2 + 1.1 * len(splits) * max(1, len(labels) / 2), 3.2), constrained_layout=True
    )
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        acc = report["models"][label]["accuracy"]
        pos = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(splits))]
        bars = ax.bar(
            pos, [acc[s] for s in splits], width, label=label, color=colours[i % len(colours)]
        )
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(splits)), splits)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy: the evaluated split ('data') and each OOD split", fontsize=9)
    ax.legend(fontsize=8)
    written.append(save_figure(fig, out / "ood_accuracy.png"))

    if len(labels) >= 2:
        described = report_keys()
        first = report["models"][labels[0]]["explainers"][methods[0]]
        keys = [k for k in described if k in first]  # the grid follows the declared metrics
        cols = min(3, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(
            rows, cols, figsize=(4 + 1.2 * len(methods) * len(labels) / 2 * cols, 8 * rows / 3),
            squeeze=False, constrained_layout=True,
        )  # fmt: skip
        for ax in axes.flat[len(keys) :]:
            ax.set_visible(False)
        for ax, key in zip(axes.flat, keys, strict=False):
            for i, label in enumerate(labels):
                values = [report["models"][label]["explainers"][m][key] for m in methods]
                pos = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(methods))]
                ax.bar(pos, [math.nan if v is None else v for v in values], width, label=label,
                       color=colours[i % len(colours)])  # fmt: skip
            ax.set_xticks(range(len(methods)), methods, fontsize=7)
            ax.set_title(described[key], fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(f"Explanation quality per method: {' vs '.join(labels)}", fontsize=10)
        written.append(save_figure(fig, out / "before_after.png"))

    if shown is not None and heatmaps:
        written.append(
            save_figure(explanation_grid(shown, heatmaps, row_titles), out / "heatmaps.png")
        )
    return written


def write_sanity(
    models: Mapping[str, nn.Module],
    data: Mapping[str, Dataset],
    methods: Sequence[str],
    out: Path,
    batch_size: int = 8,
) -> dict:
    """Model-randomisation checks (:func:`relreg.metrics.sanity_report`) on each model's first
    ``batch_size`` images; writes ``sanity_<method>.png`` (the first model: original map, then each
    cascading step) and returns ``{label: {method: summary}}`` for ``report.json``."""
    from relreg.metrics import sanity_report

    summary = {}
    for label, model in models.items():
        dataset = data[label]
        batch = next(iter(DataLoader(dataset, batch_size=min(batch_size, len(dataset)))))
        images = batch["image"].to(next(model.parameters()).device)
        found, results = sanity_report({label: model}, images, list(methods))
        summary.update(found)
        if label != next(iter(models)):
            continue
        shown = displayable(images[:4].cpu(), dataset, model)
        for method in methods:
            r = results[f"{label}/{method}"]
            columns = {"original": r.maps[0, :4]} | {
                s: m[:4] for s, m in zip(r.steps, r.maps[1:], strict=True)
            }
            save_figure(explanation_grid(shown, columns), Path(out) / f"sanity_{method}.png")
    return summary
