"""Which models ``relreg evaluate`` compares, and rebuilding them from checkpoints.

A ``relreg fit`` checkpoint stores the architecture it was trained with (its ``model``,
``num_classes`` and ``model_kwargs`` hyperparameters, read by
:func:`relreg.models.lightning_model_args`; its weights replace any pretrained ones); plain
weights need the architecture given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from relreg.models import build_model, lightning_model_args

__all__ = ["ModelSources", "evaluation_models"]


@dataclass(frozen=True)
class ModelSources:
    """The models to evaluate: checkpoints and, optionally, timm's pretrained weights.

    Attributes:
        checkpoints (tuple[Path, ...]): weights files (two: a before/after comparison).
        pretrained (bool): also evaluate timm's pretrained weights of ``model``.
        model (str | None): timm model name; None takes it from each ``relreg fit`` checkpoint.
        num_classes (int | None): classifier size, overriding the checkpoint's.
        model_kwargs (Mapping[str, Any]): keyword arguments of ``timm.create_model``, overriding
            the checkpoint's.
        labels (tuple[str, ...] | None): names of the models in the report and figures, one per
            model (checkpoints first); None names them by the checkpoints' stems (their folders
            when two stems clash) and ``"pretrained"``.
    """

    checkpoints: Sequence[Path] = ()
    pretrained: bool = False
    model: str | None = None
    num_classes: int | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    labels: Sequence[str] | None = None

    def sources(self) -> dict[str, Path | None]:
        """The models by label: a checkpoint's path, or None for timm's pretrained weights.

        Returns:
            dict[str, Path | None]: ``{label: path or None}``, checkpoints first.

        Raises:
            ValueError: no model at all, ``pretrained`` without ``model``, a wrong number of
                labels or clashing labels.
        """
        paths = [Path(p) for p in self.checkpoints]
        stems = [p.stem for p in paths]
        # two final.ckpt of different runs: name them by their folders instead
        names = stems if len(set(stems)) == len(stems) else [p.parent.name for p in paths]
        found: list[tuple[str, Path | None]] = list(zip(names, paths, strict=True))
        if self.pretrained:
            if self.model is None:
                raise ValueError(
                    "Expected a model name (--model NAME) with pretrained weights, but got none."
                )
            found.append(("pretrained", None))
        if not found:
            raise ValueError(
                "Expected checkpoints (--checkpoint FILE ...) or pretrained weights "
                "(--pretrained), but got neither."
            )
        if self.labels is not None:
            if len(self.labels) != len(found):
                raise ValueError(
                    f"Expected one label per model (--labels): {len(found)} models, but got "
                    f"{len(self.labels)} labels."
                )
            found = [(label, path) for label, (_, path) in zip(self.labels, found, strict=True)]
        labels = [label for label, _ in found]
        if len(set(labels)) != len(labels):
            raise ValueError(f"Expected distinct model labels, but got {labels}; pass --labels.")
        return dict(found)


def evaluation_models(sources: ModelSources) -> dict[str, nn.Module]:
    """Build the models to evaluate, by label (:meth:`ModelSources.sources`).

    Each checkpoint's architecture is read from a ``relreg fit`` checkpoint and overridden by
    ``sources.model`` / ``num_classes`` / ``model_kwargs`` where given; the pretrained entry is
    timm's weights of ``sources.model``.

    Args:
        sources (ModelSources): the checkpoints, pretrained weights and architecture overrides.

    Returns:
        dict[str, nn.Module]: ``{label: model}``.

    Raises:
        ValueError: missing or clashing names or labels, or plain weights without a model name.
        FileNotFoundError: a checkpoint that does not exist.
    """
    given = {"name": sources.model, "num_classes": sources.num_classes, **sources.model_kwargs}
    given = {k: v for k, v in given.items() if v is not None}
    models = {}
    for label, path in sources.sources().items():
        found = lightning_model_args(path) if path is not None else None
        if found is None and sources.model is None:
            raise ValueError(
                f"Expected a model name (--model NAME): {str(path)!r} does not name its "
                "architecture (not a relreg fit checkpoint, or not readable)."
            )
        spec = {**(found or {}), **given}  # what the checkpoint says, overridden by what was given
        name = spec.pop("name")
        num_classes = spec.pop("num_classes", None)
        models[label] = build_model(name, path is None, path, num_classes, **spec)
    return models
