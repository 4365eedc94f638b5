"""Datasets from short specs, as ``relreg evaluate`` takes them on the command line.

A spec is ``shapes:SPLIT[:N]`` (the built-in CPU benchmark, :class:`relreg.data.SpuriousShapes`), a
folder of images and masks (:class:`relreg.data.MaskedImageFolder` layout) or an OOD folder laid out
as ``<class>/<image>`` (:class:`relreg.data.OODImageFolder`); each is preprocessed for the model
that will see it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from relreg.data.folders import MaskedImageFolder, OODImageFolder
from relreg.data.spurious import SPLITS, SpuriousShapes
from relreg.models import model_data_config

__all__ = ["load_split"]


def load_split(
    spec: str,
    model: nn.Module,
    masks: bool = True,
    classes: str | Sequence[str] | None = None,
    scoring: str = "argmax",
) -> Dataset:
    """A dataset from a spec, preprocessed for ``model`` (its input size, mean and std).

    Args:
        spec: ``shapes:SPLIT`` or ``shapes:SPLIT:N`` (the built-in benchmark, N images, default
            256), a folder with ``images/<class>/`` (and ``masks/<class>/``), or, for OOD splits
            (``masks=False``), a folder laid out as ``<class>/<image>``.
        model: the model that will see the images.
        masks: whether the split is the masked one (an ``images/`` folder is then required).
        classes: the model's label space for folders (see :func:`relreg.data.class_index`).
        scoring: ``"argmax"`` or ``"restricted"`` for OOD folders.

    Raises:
        ValueError: a malformed ``shapes:`` spec or a folder of the wrong layout.
        FileNotFoundError: a folder that does not exist.
    """
    size, mean, std = model_data_config(model)
    if spec.startswith("shapes:"):
        parts = spec.split(":")
        n = parts[2] if len(parts) == 3 else "256"
        if len(parts) not in (2, 3) or parts[1] not in SPLITS or not n.isdigit() or int(n) < 1:
            raise ValueError(
                f"Expected a spec 'shapes:SPLIT' or 'shapes:SPLIT:N' with SPLIT in {SPLITS} and "
                f"N >= 1, but got {spec!r}."
            )
        if size[0] != size[1]:
            raise ValueError(f"Expected a model with square inputs for {spec!r}, but got {size}.")
        num_classes = getattr(model, "num_classes", None)
        if not isinstance(num_classes, int) or not 2 <= num_classes <= 6:
            raise ValueError(
                f"Expected a model with 2 to 6 classes for {spec!r}, but it has {num_classes!r}."
            )
        return SpuriousShapes(
            parts[1], n=int(n), size=size[0], num_classes=num_classes, mean=mean, std=std
        )
    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Expected a data folder or a 'shapes:SPLIT' spec, but got {spec!r}."
        )
    if (root / "images").is_dir():
        return MaskedImageFolder(
            root, train=False, img_size=size[0], mean=mean, std=std, classes=classes
        )
    if masks:
        raise ValueError(
            f"Expected the masked split {spec!r} to hold images/<class>/ (and masks/<class>/), "
            "but it has no images/ folder."
        )
    return OODImageFolder(
        root, classes=classes, img_size=size[0], mean=mean, std=std, scoring=scoring
    )
