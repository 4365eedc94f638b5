"""Evaluate explainers and checkpoints: the report behind ``relreg evaluate``.

For each model (one or more checkpoints) and each explainer, on a split with foreground masks:

- the perturbation test of Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
  Visualization" (CVPR 2021): positive and negative AUC (x100) over fractions 0.1 ... 0.9;
- RISE deletion / insertion AUC (Petsiuk, Das & Saenko, BMVC 2018);
- the CVPR 2021 segmentation test: pixel accuracy, mIoU and mAP of the map against the mask;
- pointing game and relevance mass (fraction of relevance inside the mask);

and the model's accuracy on the split and on each OOD split. Everything is computed with
:mod:`relreg.metrics` (batched, one explanation per batch and method) and written as JSON
(:func:`evaluate_models`) and figures (:func:`write_figures`).

On the command line datasets are given as specs (:func:`relreg.data.load_split`).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from relreg.explain import explain, explainer_info, to_pixels
from relreg.metrics import (
    accuracy_targets,
    build_metrics,
    dataset_accuracy,
    metric_spec,
    report_keys,
    score_logits,
    scoring_classes,
)
from relreg.metrics.perturbation import PAPER_FRACTIONS, TARGET_MODES, UNITS
from relreg.validate import check_choice, check_positive_int

__all__ = ["evaluate_models", "evaluation_models"]
_MOVED = {"heatmap_grid_maps", "write_figures"}  # to relreg.report_figures


class _MethodMetrics:
    """The report's metrics (:func:`relreg.metrics.list_metrics` ``("report")``) for one explainer."""

    def __init__(
        self, model: nn.Module, unit: str, target_mode: str, steps: int, device: torch.device
    ) -> None:
        built = build_metrics(
            "report", model=model, unit=unit, target_mode=target_mode, steps=steps
        )
        self.metrics = {name: metric.to(device) for name, metric in built.items()}
        self.specs = [metric_spec(name) for name in self.metrics]
        self.masked = 0

    def update(
        self, images: Tensor, maps: Tensor, labels: Tensor, masks: Tensor, has: Tensor
    ) -> None:
        for spec in self.specs:
            if spec.inputs == "model":
                self.metrics[spec.name].update(images, maps, labels)
        if has.any():
            pixels = to_pixels(maps, size=masks.shape[-2:], normalize=False)
            for spec in self.specs:
                if spec.inputs == "masks":
                    self.metrics[spec.name].update(pixels[has], masks[has])
            self.masked += int(has.sum())

    def compute(self) -> dict:
        out: dict = {}
        for spec in self.specs:
            if spec.inputs == "masks" and not self.masked:
                out.update(dict.fromkeys(spec.outputs))
                continue
            value = self.metrics[spec.name].compute()
            out.update(value if isinstance(value, dict) else {next(iter(spec.outputs)): value})
        result = {k: None if v is None else round(float(v), 4) for k, v in out.items()}
        result["curves"] = {
            s.curve: [round(float(v), 4) for v in self.metrics[s.name].curve()]
            for s in self.specs
            if s.curve is not None
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
        models: ``{label: model}``, e.g. ``{"before": m0, "after": m1}``; each is put in eval
            mode on ``device`` (and left there).
        data: the masked split (one dataset for all models, or ``{label: dataset}`` when the
            models need different preprocessing) yielding :class:`relreg.data.Sample` dicts.
        methods: explainer names (see :func:`relreg.explain.list_explainers`).
        ood: ``{name: dataset}`` of OOD splits (accuracy only); the same for all models.
        unit: ``"pixel"`` or ``"patch"`` removal in the perturbation and RISE tests.
        target: ``"predicted"`` (explain and score the top-1 class, as in the CVPR 2021 paper) or
            ``"label"``.
        steps: RISE steps (fractions 0, 1/steps, ..., 1).
        batch_size: images per explanation batch.
        limit: evaluate the first ``limit`` images of the split only.
        method_options: per-method keyword options, e.g. ``{"smoothgrad": {"n_samples": 8}}``.
        device: where to run.
        seed: seeds the random methods (smoothgrad) for a deterministic report.
        progress: show a progress bar.

    Returns:
        ``{"methods", "unit", "target", "fractions", "seconds", "models": {label: {"n_images",
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
                model, unit, "label" if target == "label" else "predicted", steps, device
            )
            for m in methods
        }
        torch.manual_seed(seed)
        classes = scoring_classes(dataset)
        correct = masked = 0
        for batch in DataLoader(subset, batch_size=batch_size):
            images, labels = batch["image"].to(device), batch["label"].to(device)
            masks, has = batch["mask"].to(device), batch["has_mask"].to(device).bool()
            with torch.no_grad():
                logits = score_logits(model(images), classes)
            correct += int((logits.argmax(1) == accuracy_targets(logits, batch)).sum())
            masked += int(has.sum())
            bar.update(1)
            explained = labels if target == "label" else None
            for name in methods:
                maps = explain(model, images, name, target=explained, **options.get(name, {}))
                metrics[name].update(images, maps.detach(), labels, masks, has)
                bar.update(1)
        accuracy = {"data": round(correct / max(n, 1), 4)}
        for name, split in ood.items():
            accuracy[name] = round(
                dataset_accuracy(model, split, batch_size, device, bar.update), 4
            )
        bar.close()
        report["models"][label] = {
            "n_images": n,
            "n_masked": masked,
            "accuracy": accuracy,
            "ood_mean": round(sum(accuracy[k] for k in ood) / len(ood), 4) if ood else None,
            "explainers": {name: metrics[name].compute() for name in methods},
        }
    report["fractions"] = [0.0, *PAPER_FRACTIONS]
    report["deletion_steps"] = steps
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def __getattr__(name: str) -> object:
    """Deprecated names: ``REPORT_METRICS`` (the report's keys now come from the metric registry),
    ``heatmap_grid_maps`` and ``write_figures`` (moved to :mod:`relreg.report_figures`)."""
    if name == "REPORT_METRICS":
        import warnings

        warnings.warn(
            "relreg.evaluate.REPORT_METRICS is deprecated; use relreg.metrics.report_keys().",
            DeprecationWarning,
            stacklevel=2,
        )
        return report_keys()
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(
            f"relreg.evaluate.{name} moved to relreg.report_figures.{name}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("relreg.report_figures"), name)
    raise AttributeError(f"module 'relreg.evaluate' has no attribute {name!r}")


def evaluation_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The models ``relreg evaluate`` compares, by label: each ``--checkpoint`` (its architecture
    read from a relreg fit checkpoint, overridden by ``--model`` / ``--num-classes`` /
    ``--model-kwargs``) and, with ``--pretrained``, timm's weights of ``--model``.

    Raises:
        ValueError: for missing or clashing names, labels or architectures.
    """
    from relreg.models import build_model, lightning_model_args

    stems = [p.stem for p in args.checkpoint]
    # two final.ckpt of different runs: name them by their folders instead
    names = stems if len(set(stems)) == len(stems) else [p.parent.name for p in args.checkpoint]
    sources: list[tuple[str, Path | None]] = list(zip(names, args.checkpoint, strict=True))
    if args.pretrained:
        if args.model is None:
            raise ValueError("Expected --model NAME with --pretrained, but got no --model.")
        sources.append(("pretrained", None))
    if not sources:
        raise ValueError("Expected --checkpoint FILE ... or --pretrained, but got neither.")
    if args.labels is not None:
        if len(args.labels) != len(sources):
            raise ValueError(
                f"Expected one --labels entry per model ({len(sources)}), but got {len(args.labels)}."
            )
        sources = [(label, path) for label, (_, path) in zip(args.labels, sources, strict=True)]
    names = [label for label, _ in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"Expected distinct model labels, but got {names}; pass --labels.")
    models = {}
    for label, path in sources:
        given = {"name": args.model, "num_classes": args.num_classes, **args.model_kwargs}
        found = lightning_model_args(path) if path is not None else None
        if found is None and args.model is None:
            raise ValueError(
                f"Expected --model NAME: {str(path)!r} does not name its architecture (not a "
                "relreg fit checkpoint, or not readable)."
            )
        # what the checkpoint says, overridden by what was given on the command line
        spec = {**(found or {}), **{k: v for k, v in given.items() if v is not None}}
        name, num_classes = spec.pop("name"), spec.pop("num_classes", None)
        models[label] = build_model(name, path is None, path, num_classes, **spec)
    return models
