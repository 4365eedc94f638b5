"""``relreg evaluate --sanity``: the model-randomisation checks of Adebayo et al. on one batch per
model, with a figure per method. The checks themselves are :mod:`relreg.metrics.sanity`'s
(:func:`relreg.metrics.sanity_report`); this module picks the batch and draws the figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader, Dataset

from relreg.evaluation.figures import displayable
from relreg.metrics import sanity_report
from relreg.viz import explanation_grid, save_figure

__all__ = ["write_sanity"]


def write_sanity(
    models: Mapping[str, nn.Module],
    data: Mapping[str, Dataset],
    methods: Sequence[str],
    out: Path,
    batch_size: int = 8,
) -> dict:
    """Model-randomisation checks on each model's first ``batch_size`` images.

    Writes ``sanity_<method>.png`` for the first model: four images, their original map, then
    the map after each cascading randomisation step.

    Args:
        models (Mapping[str, nn.Module]): ``{label: model}``; each is explained on its device.
        data (Mapping[str, Dataset]): ``{label: dataset}`` of :class:`relreg.data.Sample` dicts.
        methods (Sequence[str]): explainer names.
        out (Path): the output directory.
        batch_size (int): images per model.

    Returns:
        dict: ``{label: {method: summary}}`` (:meth:`relreg.metrics.RandomisationResult.summary`)
        for ``report.json``.
    """
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
            steps = {s: m[:4] for s, m in zip(r.steps, r.maps[1:], strict=True)}
            columns = {"original": r.maps[0, :4], **steps}
            save_figure(explanation_grid(shown, columns), Path(out) / f"sanity_{method}.png")
    return summary
