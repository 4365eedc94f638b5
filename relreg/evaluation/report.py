"""The report behind ``relreg evaluate``: explainers and checkpoints, evaluated.

For each model (one or more checkpoints) and each explainer, on a split with foreground masks:

- the perturbation test of Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
  Visualization" (CVPR 2021): positive and negative AUC (x100) over fractions 0.1 ... 0.9;
- RISE deletion / insertion AUC (Petsiuk, Das & Saenko, BMVC 2018);
- the CVPR 2021 segmentation test: pixel accuracy, mIoU and mAP of the map against the mask;
- pointing game and relevance mass (fraction of relevance inside the mask);

and the model's accuracy on the split and on each OOD split. Everything is computed with
:mod:`relreg.metrics` (batched, one explanation per batch and method) and returned as a dict
(:func:`evaluate_models`). :func:`run_evaluation` is the whole command: it builds the models
(:mod:`relreg.evaluation.models`), loads the splits from specs (:func:`relreg.data.load_split`),
and writes ``report.json``, the figures (:mod:`relreg.evaluation.figures`) and the sanity checks
(:mod:`relreg.evaluation.sanity`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from relreg.data import bg_gap, expand_imagenet9, is_imagenet9, load_split
from relreg.data.eval_split import num_groups_of
from relreg.evaluation.display import curve_names, summary_columns
from relreg.evaluation.figures import heatmap_rows, write_figures
from relreg.evaluation.models import ModelSources, evaluation_models
from relreg.evaluation.sanity import write_sanity
from relreg.explain import explain, explainer_info, to_pixels
from relreg.io import atomic_write, check_writable
from relreg.metrics import (
    GroupAccuracy,
    accuracy_targets,
    build_metrics,
    dataset_scores,
    keyed_result,
    metric_keys,
    metric_spec,
    score_logits,
    scoring_classes,
)
from relreg.metrics.functional.faithfulness import PAPER_FRACTIONS, TARGET_MODES, UNITS
from relreg.models import check_same_preprocessing
from relreg.validate import check_choice, check_positive_int

__all__ = ["EvaluationSettings", "evaluate_models", "report_lines", "run_evaluation"]


class _MethodMetrics:
    """The report's metrics (:func:`relreg.metrics.list_metrics` ``("report")``) for one
    explainer."""

    def __init__(
        self,
        model: nn.Module,
        unit: str,
        target_mode: str,
        steps: int,
        device: torch.device,
        method: str,
        explain_options: Mapping[str, object],
    ) -> None:
        built = build_metrics(
            "report",
            model=model,
            unit=unit,
            target_mode=target_mode,
            steps=steps,
            method=method,
            explain_options=explain_options,
        )
        self.metrics = {name: metric.to(device) for name, metric in built.items()}
        self.inputs = {name: metric_spec(name).inputs for name in self.metrics}
        self.masked = 0

    def update(
        self, images: Tensor, maps: Tensor, labels: Tensor, masks: Tensor, has: Tensor
    ) -> None:
        image_pixels = to_pixels(maps, size=images.shape[-2:], normalize=False)
        for name, inputs in self.inputs.items():
            if inputs == "model":
                self.metrics[name].update(images, maps, labels)
            elif inputs == "maps":
                self.metrics[name].update(image_pixels)
        if has.any():
            pixels = to_pixels(maps, size=masks.shape[-2:], normalize=False)
            for name, inputs in self.inputs.items():
                if inputs == "masks":
                    self.metrics[name].update(pixels[has], masks[has])
            self.masked += int(has.sum())

    def compute(self) -> dict:
        out: dict = {}
        for name, inputs in self.inputs.items():
            if inputs == "masks" and not self.masked:
                out.update(dict.fromkeys(metric_keys(name)))
                continue
            out.update(keyed_result(name, self.metrics[name].compute()))
        # None where a metric has no value (no masked image; every mask empty, every map zero)
        result = {
            k: None if v is None or not math.isfinite(float(v)) else round(float(v), 4)
            for k, v in out.items()
        }
        result["curves"] = {
            curve: [round(float(v), 4) for v in self.metrics[name].curve()]
            for name, curve in curve_names().items()
        }
        return result


def evaluate_models(
    models: Mapping[str, nn.Module],
    data: Mapping[str, Dataset] | Dataset,
    methods: Sequence[str] = ("chefer", "rollout", "gradcam"),
    ood: Mapping[str, Dataset] | None = None,
    unit: str = "pixel",
    target: str = "predicted",
    steps: int = 10,
    batch_size: int = 32,
    limit: int | None = None,
    method_options: Mapping[str, Mapping[str, object]] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Explanation quality of every method and OOD accuracy of every model.

    Args:
        models (Mapping[str, nn.Module]): ``{label: model}``, e.g. ``{"before": m0, "after":
            m1}``; each is put in eval mode on ``device`` (and left there).
        data (Mapping[str, Dataset] | Dataset): the masked split (one dataset for all models, or
            ``{label: dataset}`` when the models need different preprocessing) yielding
            :class:`relreg.data.Sample` dicts.
        methods (Sequence[str]): explainer names (see :func:`relreg.explain.list_explainers`).
        ood (Mapping[str, Dataset] | None): ``{name: dataset}`` of OOD splits (accuracy only);
            the same for all models.
        unit (str): ``"pixel"`` or ``"patch"`` removal in the perturbation and RISE tests.
        target (str): ``"predicted"`` (explain and score the top-1 class, as in the CVPR 2021
            paper) or ``"label"``.
        steps (int): RISE steps (fractions 0, 1/steps, ..., 1).
        batch_size (int): images per explanation batch.
        limit (int | None): evaluate the first ``limit`` images of the split only.
        method_options (Mapping[str, Mapping[str, object]] | None): per-method keyword options,
            e.g. ``{"smoothgrad": {"n_samples": 8}}``.
        device (str | torch.device): where to run.
        seed (int): seeds the random methods (smoothgrad) for a deterministic report.
        progress (bool): show a progress bar.

    Returns:
        dict: ``{"methods", "unit", "target", "fractions", "seconds", "models": {label: {"n_images",
        "n_masked", "accuracy": {"data": float, <ood name>: float}, "ood_mean": float or
        None, "explainers": {method: {<report_keys()>: float or None, "curves": {...}}}}}}``;
        accuracies are fractions, perturbation AUCs are x100 as in the paper.

    Raises:
        ValueError: an unknown method or option, a bad ``unit`` / ``target`` / ``limit``.
    """
    if not models:
        raise ValueError("Expected at least one model, but got none.")
    if not methods:
        raise ValueError("Expected at least one explainer in methods, but got none.")
    options = {k: dict(v) for k, v in (method_options or {}).items()}
    for name in methods:
        if "progress" in explainer_info(name).options:  # unknown names fail before any work
            options.setdefault(name, {}).setdefault("progress", False)  # the report has its own bar
    check_choice("target", target, TARGET_MODES)
    check_choice("unit", unit, UNITS)
    check_positive_int("limit", limit, allow_none=True)
    check_positive_int("batch_size", batch_size)
    device = torch.device(device)
    ood = dict(ood or {})
    splits = data if isinstance(data, Mapping) else dict.fromkeys(models, data)
    if set(splits) != set(models):
        raise ValueError(
            f"Expected data for every model {sorted(models)}, but got it for {sorted(splits)}."
        )
    t0 = time.perf_counter()
    report: dict = {"methods": list(methods), "unit": unit, "target": target, "models": {}}
    for label, model in models.items():
        model = model.eval().to(device)
        dataset = splits[label]
        n = len(dataset) if limit is None else min(limit, len(dataset))
        subset = torch.utils.data.Subset(dataset, range(n))
        n_batches = math.ceil(n / batch_size)
        ood_batches = sum(math.ceil(len(d) / batch_size) for d in ood.values())
        bar = tqdm(
            total=n_batches * (len(methods) + 1) + ood_batches,
            desc=f"evaluate {label}",
            unit="batch",
            disable=not progress,
        )
        metrics = {
            m: _MethodMetrics(
                model,
                unit,
                "label" if target == "label" else "predicted",
                steps,
                device,
                m,
                options.get(m, {}),
            )
            for m in methods
        }
        torch.manual_seed(seed)
        classes = scoring_classes(dataset)
        num_groups = num_groups_of(dataset)
        group_metric = GroupAccuracy(num_groups).to(device) if num_groups else None
        correct = masked = 0
        for batch in DataLoader(subset, batch_size=batch_size):
            images, labels = batch["image"].to(device), batch["label"].to(device)
            masks, has = batch["mask"].to(device), batch["has_mask"].to(device).bool()
            with torch.no_grad():
                logits = score_logits(model(images), classes)
            targets = accuracy_targets(logits, batch)
            correct += int((logits.argmax(1) == targets).sum())
            if group_metric is not None and "group" in batch:
                group_metric.update(logits, targets, batch["group"].to(device))
            masked += int(has.sum())
            bar.update(1)
            explained = labels if target == "label" else None
            for name in methods:
                maps = explain(model, images, name, target=explained, **options.get(name, {}))
                metrics[name].update(images, maps.detach(), labels, masks, has)
                bar.update(1)
        accuracy = {"data": round(correct / max(n, 1), 4)}
        groups = {"data": _group_entry(group_metric)} if group_metric is not None else {}
        for name, split in ood.items():
            scores = dataset_scores(model, split, batch_size, device, bar.update)
            accuracy[name] = round(scores.pop("acc"), 4)
            if scores:
                groups[name] = {k: round(v, 4) for k, v in scores.items()}
        bar.close()
        report["models"][label] = {
            "n_images": n,
            "n_masked": masked,
            "accuracy": accuracy,
            "ood_mean": round(sum(accuracy[k] for k in ood) / len(ood), 4) if ood else None,
            "groups": groups,
            "bg_gap": _bg_gaps(accuracy),
            "explainers": {name: metrics[name].compute() for name in methods},
        }
    report["fractions"] = [0.0, *PAPER_FRACTIONS]
    report["deletion_steps"] = steps
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _group_entry(metric: GroupAccuracy) -> dict[str, float] | None:
    """The report's worst- and average-group accuracy of a filled metric (None when empty)."""
    if not metric.update_called:
        return None
    found = metric.compute()
    return {
        "worst_group_acc": round(float(found["worst_group_accuracy"]), 4),
        "average_group_acc": round(float(found["average_group_accuracy"]), 4),
    }


def _bg_gaps(accuracy: Mapping[str, float]) -> dict[str, float]:
    """The BG-gap of every ImageNet-9 split set in ``accuracy`` (``<name>/mixed_same`` and
    ``<name>/mixed_rand``, as :func:`relreg.data.expand_imagenet9` names them)."""
    gaps = {}
    for key in accuracy:
        if key.endswith("/mixed_same") and key.replace("mixed_same", "mixed_rand") in accuracy:
            name = key[: -len("/mixed_same")]
            parts = {"mixed_same": accuracy[key], "mixed_rand": accuracy[f"{name}/mixed_rand"]}
            gaps[name] = round(bg_gap(parts), 4)
    return gaps


@dataclass(frozen=True)
class EvaluationSettings:
    """What ``relreg evaluate`` measures, on which data, and where it writes.

    Attributes:
        data (str): the masked split, a :func:`relreg.data.load_split` spec (a folder with
            ``images/<class>/`` and ``masks/<class>/``, or ``shapes:SPLIT[:N]``).
        out (Path): the output directory (``report.json`` and figures).
        ood (Mapping[str, str]): ``{name: spec}`` of OOD splits, accuracy only (a folder of
            ``<class>/<image>`` or ``shapes:ood``); no name may be ``"data"``.
        classes (str | None): label space file (one class name per line).
        scoring (str): ``"argmax"`` or ``"restricted"`` for OOD folders.
        preprocessing (str): ``"model"`` (the model's timm ``pretrained_cfg``) or
            ``"robustvit"``.
        methods (Sequence[str]): explainer names.
        unit (str): ``"pixel"`` or ``"patch"`` removal.
        target (str): ``"predicted"`` or ``"label"``.
        steps (int): deletion / insertion steps.
        limit (int | None): evaluate the first ``limit`` images only.
        batch_size (int): images per batch.
        num_heatmaps (int): rows of ``heatmaps.png`` (0: no heatmap figure).
        device (str): where to run.
        seed (int): seeds the random methods.
        overwrite (bool): replace an existing ``report.json``.
        sanity (bool): also run the model-randomisation sanity checks on the first batch.
    """

    data: str
    out: Path
    ood: Mapping[str, str] = field(default_factory=dict)
    classes: str | None = None
    scoring: str = "argmax"
    preprocessing: str = "model"
    methods: Sequence[str] = ("chefer", "rollout", "gradcam")
    unit: str = "pixel"
    target: str = "predicted"
    steps: int = 10
    limit: int | None = None
    batch_size: int = 32
    num_heatmaps: int = 6
    device: str = "cpu"
    seed: int = 0
    overwrite: bool = False
    sanity: bool = False

    def check(self) -> None:
        """Raise on settings that would fail after the work, before any of it.

        Raises:
            ValueError: a negative ``num_heatmaps``, an OOD split named ``"data"`` or an
                output directory that cannot be written.
            FileExistsError: ``out/report.json`` exists and ``overwrite`` is False.
        """
        if self.num_heatmaps < 0:
            raise ValueError(
                f"Expected num_heatmaps >= 0 (--num-heatmaps), but got {self.num_heatmaps}."
            )
        if "data" in self.ood:
            raise ValueError("Expected OOD split names other than 'data' (the evaluated split).")
        report_path = Path(self.out) / "report.json"
        if report_path.exists() and not self.overwrite:
            raise FileExistsError(
                f"Output {str(report_path)!r} exists; pass --overwrite to replace it."
            )
        check_writable(self.out)


def run_evaluation(sources: ModelSources, settings: EvaluationSettings) -> dict:
    """``relreg evaluate``: evaluate the models, write ``report.json`` and the figures.

    Args:
        sources (ModelSources): the checkpoints and pretrained weights to compare.
        settings (EvaluationSettings): the data, the metrics' settings and the output.

    Returns:
        dict: the report written to ``settings.out / "report.json"``: :func:`evaluate_models`'
        report with ``data``, ``ood``, ``device``, ``preprocessing``, ``checkpoints`` and, with
        ``settings.sanity``, ``sanity``.

    Raises:
        ValueError: bad settings, models or data specs, checked before the work where possible.
        FileExistsError: an existing report without ``settings.overwrite``.
    """
    settings.check()  # fail before the work, not after it
    models = evaluation_models(sources)
    check_same_preprocessing(models)
    pre = {"classes": settings.classes, "preprocessing": settings.preprocessing}
    data = {label: load_split(settings.data, m, **pre) for label, m in models.items()}
    first = next(iter(models.values()))
    ood = {}
    for name, spec in settings.ood.items():
        if is_imagenet9(spec):  # every variation of the challenge, named <name>/<variation>
            ood.update(expand_imagenet9(name, spec, first, settings.preprocessing))
        else:
            ood[name] = load_split(spec, first, masks=False, scoring=settings.scoring, **pre)
    found = evaluate_models(
        models,
        data,
        settings.methods,
        ood,
        unit=settings.unit,
        target=settings.target,
        steps=settings.steps,
        batch_size=settings.batch_size,
        limit=settings.limit,
        device=settings.device,
        seed=settings.seed,
    )
    report = {"data": settings.data, "ood": dict(settings.ood), "device": str(settings.device)}
    report.update(found)
    report["preprocessing"] = {
        name: ds.preprocessing_info() if hasattr(ds, "preprocessing_info") else "model's mean/std"
        for name, ds in {"data": next(iter(data.values())), **ood}.items()
    }
    report["checkpoints"] = {
        label: "pretrained" if path is None else str(path)
        for label, path in sources.sources().items()
    }
    _write_figures(report, models, next(iter(data.values())), settings)
    if settings.sanity:
        methods = settings.methods
        report["sanity"] = write_sanity(models, data, methods, settings.out, settings.batch_size)
    text = json.dumps(report, indent=2)
    atomic_write(Path(settings.out) / "report.json", lambda tmp: Path(tmp).write_text(text))
    return report


def _write_figures(
    report: dict, models: Mapping[str, nn.Module], dataset: Dataset, settings: EvaluationSettings
) -> list[Path]:
    """The report's figures, with ``settings.num_heatmaps`` rows of heatmaps of ``dataset``."""
    if not settings.num_heatmaps:
        return write_figures(report, settings.out)
    rows = heatmap_rows(models, dataset, settings.methods, settings.num_heatmaps, settings.seed)
    return write_figures(report, settings.out, rows.shown, rows.heatmaps, rows.titles)


def report_lines(report: Mapping) -> list[str]:
    """A plain-text table of a report: the summary metrics per model and method, then each
    model's accuracies (what ``relreg evaluate`` prints).

    Args:
        report (Mapping): a report from :func:`evaluate_models` or :func:`run_evaluation`.

    Returns:
        list[str]: the lines of the table.
    """
    keys = summary_columns()
    lines = [f"{'model':12s} {'method':24s} " + " ".join(f"{v:>10s}" for v in keys.values())]
    for label, entry in report["models"].items():
        for method, r in entry["explainers"].items():
            cells = " ".join(f"{'-' if r[k] is None else format(r[k], '.3f'):>10s}" for k in keys)
            lines.append(f"{label:12s} {method:24s} {cells}")
        acc = ", ".join(f"{k} {v:.3f}" for k, v in entry["accuracy"].items())
        lines.append(f"{label:12s} accuracy: {acc}")
        for name, found in entry.get("groups", {}).items():
            if not found:
                continue
            cells = ", ".join(f"{k} {v:.3f}" for k, v in found.items())
            lines.append(f"{label:12s} groups of {name}: {cells}")
        for name, gap in entry.get("bg_gap", {}).items():
            lines.append(f"{label:12s} BG-gap of {name} (mixed_same - mixed_rand): {gap:+.3f}")
    return lines
