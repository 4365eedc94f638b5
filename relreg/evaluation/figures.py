"""The figures of ``relreg evaluate``'s report: heatmap grids, perturbation curves, accuracy bars
and before/after comparisons (the sanity-check figures are :mod:`relreg.evaluation.sanity`'s)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from relreg.data import label_names
from relreg.evaluation.display import panel_titles
from relreg.explain import explain, to_pixels
from relreg.viz import explanation_grid, save_figure

__all__ = ["HeatmapRows", "displayable", "heatmap_grid_maps", "heatmap_rows", "write_figures"]


@dataclass
class HeatmapRows:
    """The rows of ``heatmaps.png``: images, their masks and maps, and a title per row.

    Attributes:
        shown (Tensor): ``(B, 3, H, W)`` images in [0, 1].
        heatmaps (dict[str, Tensor]): ``{"mask": (B, H, W), "<label>/<method>": (B, H, W)}``.
        titles (list[str]): the class name of each row.
    """

    shown: Tensor
    heatmaps: dict[str, Tensor]
    titles: list[str]


def displayable(images: Tensor, dataset: Dataset, model: nn.Module) -> Tensor:
    """Images with their normalisation undone, for display.

    Args:
        images (Tensor): ``(B, 3, H, W)`` normalised images of ``dataset``.
        dataset (Dataset): their dataset; its own ``preprocessing`` is undone when it has one,
            else the model's timm data config (what :func:`relreg.data.load_split` used).
        model (nn.Module): the timm model the images were prepared for.

    Returns:
        Tensor: ``(B, 3, H, W)`` images in [0, 1].
    """
    import timm.data

    pre = getattr(dataset, "preprocessing", None)
    config = pre.describe() if pre else timm.data.resolve_model_data_config(model)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def heatmap_grid_maps(
    models: Mapping[str, nn.Module],
    images: Tensor,
    methods: Sequence[str],
    method_options: Mapping[str, Mapping[str, object]] | None = None,
) -> dict[str, Tensor]:
    """Min-max normalised pixel maps of every model and method, for a heatmap grid.

    Args:
        models (Mapping[str, nn.Module]): ``{label: model}``; each is explained on its device.
        images (Tensor): ``(B, 3, H, W)`` normalised images.
        methods (Sequence[str]): explainer names.
        method_options (Mapping[str, Mapping[str, object]] | None): per-method keyword options.

    Returns:
        dict[str, Tensor]: ``{"<label>/<method>": (B, H, W)}`` (just ``method`` for one model).
    """
    options = method_options or {}
    out = {}
    for label, model in models.items():
        device = next(model.parameters()).device
        for name in methods:
            maps = explain(model.eval(), images.to(device), name, **options.get(name, {}))
            key = name if len(models) == 1 else f"{label}/{name}"
            out[key] = to_pixels(maps.detach(), size=images.shape[-2:]).cpu()
    return out


def heatmap_rows(
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    methods: Sequence[str],
    n: int,
    seed: int = 0,
) -> HeatmapRows:
    """The first ``n`` images of a masked split with every model's maps (``heatmaps.png``).

    Args:
        models (Mapping[str, nn.Module]): ``{label: model}``, sharing one preprocessing.
        dataset (Dataset): the masked split, yielding :class:`relreg.data.Sample` dicts.
        methods (Sequence[str]): explainer names.
        n (int): number of rows (at most the dataset's length).
        seed (int): seeds the random methods (smoothgrad).

    Returns:
        HeatmapRows: the images, the masks and maps, and the class names.
    """
    first = next(iter(models.values()))
    samples = [dataset[i] for i in range(min(n, len(dataset)))]
    images = torch.stack([s["image"] for s in samples])
    torch.manual_seed(seed)
    heat = {"mask": torch.stack([s["mask"] for s in samples]).float()}
    heat.update(heatmap_grid_maps(models, images, methods))
    names = label_names(first.num_classes, getattr(dataset, "class_to_idx", None))
    titles = [names[int(s["label"])] for s in samples]
    return HeatmapRows(displayable(images, dataset, first), heat, titles)


def write_figures(
    report: Mapping,
    out: str | Path,
    shown: Tensor | None = None,
    heatmaps: Mapping[str, Tensor] | None = None,
    row_titles: Sequence[str] | None = None,
) -> list[Path]:
    """Figures of a report from :func:`relreg.evaluation.evaluate_models`.

    Writes ``perturbation_curves.png`` (accuracy vs removed fraction, positive and negative, one
    panel per method, one colour per model), ``ood_accuracy.png`` (accuracy per split and model),
    ``before_after.png`` (every metric per method, one bar per model; with two or more models)
    and ``heatmaps.png`` (when ``shown`` images and ``heatmaps`` are given).

    Args:
        report (Mapping): the report.
        out (str | Path): the output directory.
        shown (Tensor | None): ``(B, 3, H, W)`` images in [0, 1] for ``heatmaps.png``.
        heatmaps (Mapping[str, Tensor] | None): ``{column: (B, H, W)}`` maps of those images.
        row_titles (Sequence[str] | None): a title per row of ``heatmaps.png``.

    Returns:
        list[Path]: the paths written.
    """
    out = Path(out)
    written = [
        save_figure(_perturbation_figure(report), out / "perturbation_curves.png"),
        save_figure(_accuracy_figure(report), out / "ood_accuracy.png"),
    ]
    if len(report["models"]) >= 2:
        written.append(save_figure(_before_after_figure(report), out / "before_after.png"))
    if shown is not None and heatmaps:
        grid = explanation_grid(shown, heatmaps, row_titles)
        written.append(save_figure(grid, out / "heatmaps.png"))
    return written


def _colours() -> list[str]:
    import matplotlib.pyplot as plt

    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _offsets(n_groups: int, index: int, n_bars: int, width: float) -> list[float]:
    """Bar positions of bar ``index`` of ``n_bars`` in each of ``n_groups`` groups."""
    return [j + (index - (n_bars - 1) / 2) * width for j in range(n_groups)]


def _perturbation_figure(report: Mapping) -> object:
    import matplotlib.pyplot as plt

    labels = list(report["models"])
    methods = list(report["methods"])
    colours = _colours()
    fig, axes = plt.subplots(
        1, len(methods), figsize=(3.3 * len(methods), 3.2), squeeze=False, constrained_layout=True
    )
    x = report["fractions"]
    removed = "pixels" if report["unit"] == "pixel" else "patches"
    for ax, method in zip(axes[0], methods, strict=True):
        for i, label in enumerate(labels):
            r = report["models"][label]["explainers"][method]
            c = colours[i % len(colours)]
            positive = f"{label} pos {r['perturbation_positive']:.1f}"
            negative = f"{label} neg {r['perturbation_negative']:.1f}"
            ax.plot(x, r["curves"]["positive"], "-o", ms=3, color=c, label=positive)
            ax.plot(x, r["curves"]["negative"], "--s", ms=3, color=c, label=negative)
        ax.set_title(method)
        ax.set_xlabel(f"fraction of {removed} removed")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="AUC x100", title_fontsize=7)
    axes[0, 0].set_ylabel(f"top-1 accuracy ({report['target']} class)")
    fig.suptitle(
        "Perturbation test (positive: solid, lower is better; negative: dashed, higher is better)",
        fontsize=9,
    )
    return fig


def _accuracy_figure(report: Mapping) -> object:
    import matplotlib.pyplot as plt

    labels = list(report["models"])
    colours = _colours()
    splits = list(report["models"][labels[0]]["accuracy"])
    fig, ax = plt.subplots(
        figsize=(1.2 + 1.1 * len(splits) * max(1, len(labels) / 2), 3.2), constrained_layout=True
    )
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        acc = report["models"][label]["accuracy"]
        pos = _offsets(len(splits), i, len(labels), width)
        colour = colours[i % len(colours)]
        bars = ax.bar(pos, [acc[s] for s in splits], width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(splits)), splits)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy: the evaluated split ('data') and each OOD split", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _before_after_figure(report: Mapping) -> object:
    import matplotlib.pyplot as plt

    labels = list(report["models"])
    methods = list(report["methods"])
    colours = _colours()
    width = 0.8 / len(labels)
    described = panel_titles()
    first = report["models"][labels[0]]["explainers"][methods[0]]
    keys = [k for k in described if k in first]  # the grid follows the declared metrics
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    size = (4 + 1.2 * len(methods) * len(labels) / 2 * cols, 8 * rows / 3)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, constrained_layout=True)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for i, label in enumerate(labels):
            values = [report["models"][label]["explainers"][m][key] for m in methods]
            heights = [math.nan if v is None else v for v in values]
            pos = _offsets(len(methods), i, len(labels), width)
            ax.bar(pos, heights, width, label=label, color=colours[i % len(colours)])
        ax.set_xticks(range(len(methods)), methods, fontsize=7)
        ax.set_title(described[key], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Explanation quality per method: {' vs '.join(labels)}", fontsize=10)
    return fig
