"""Datasets from short specs, as ``relreg evaluate`` takes them on the command line.

A spec is ``shapes:SPLIT[:N]`` (the built-in CPU benchmark, :class:`relreg.data.SpuriousShapes`),
``scenes:SPLIT[:N]`` (its real-texture counterpart, :class:`relreg.data.SpuriousScenes`), a
folder of images and masks (:class:`relreg.data.MaskedImageFolder` layout) or an OOD folder laid out
as ``<class>/<image>`` (:class:`relreg.data.OODImageFolder`); each is preprocessed for the model
that will see it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from relreg.data.files import detect_mask_format
from relreg.data.folders import MaskedImageFolder, OODImageFolder
from relreg.data.preprocessing import PREPROCESSING, Preprocessing
from relreg.data.scenes import SpuriousScenes
from relreg.data.spurious import SPLITS, SpuriousShapes
from relreg.data.suites import detect_label_space
from relreg.data.waterbirds import METADATA, Waterbirds
from relreg.models import model_data_config
from relreg.validate import check_choice

__all__ = ["BENCHMARKS", "load_split"]

# spec prefix -> the generated benchmark and its most classes
BENCHMARKS = {"shapes": (SpuriousShapes, 6), "scenes": (SpuriousScenes, 10)}


def load_split(
    spec: str,
    model: nn.Module,
    masks: bool = True,
    classes: str | Sequence[str] | None = None,
    scoring: str = "argmax",
    preprocessing: str = "model",
) -> Dataset:
    """A dataset from a spec, preprocessed for ``model`` (its input size, mean and std).

    Args:
        spec: ``shapes:SPLIT`` or ``shapes:SPLIT:N`` (the built-in benchmark, N images, default
            256), ``scenes:SPLIT[:N]`` (the same with real digits and photographs), a Waterbirds
            folder (with ``metadata.csv``: its test split, with CUB's masks from a
            ``CUB_200_2011/segmentations`` beside it), a folder
            with ``images/<class>/`` (and ``masks/<class>/``), or, for OOD splits
            (``masks=False``), a folder laid out as ``<class>/<image>``.
        model: the model that will see the images.
        masks: whether the split is the masked one (an ``images/`` folder is then required).
        classes: the model's label space for folders (see :func:`relreg.data.class_index`).
        scoring: ``"argmax"`` or ``"restricted"`` for OOD folders.
        preprocessing: for folders, ``"model"`` (the model's timm ``pretrained_cfg``: mean, std,
            crop ratio, interpolation) or ``"robustvit"`` (resize 256 / 224, mean = std = 0.5);
            the generated benchmarks always use the model's mean and std.

    With ``classes=None`` and a 1000-class model, a folder's label space is read from its layout
    (:func:`relreg.data.suites.detect_label_space`: ImageNet wnids, ImageNet-V2 indices, ObjectNet
    with its ``mappings/``, SI-Score object names); other folders map sorted names to 0..C-1.
    Masks stored as RGB are read as ImageNet-S encoded (``relreg prepare imagenet-s`` output),
    grey ones as binary (:func:`relreg.data.files.detect_mask_format`).

    Raises:
        ValueError: a malformed ``shapes:`` / ``scenes:`` spec or a folder of the wrong layout.
        FileNotFoundError: a folder that does not exist.
    """
    size, mean, std = model_data_config(model)
    kind, colon, _ = spec.partition(":")
    if colon and kind in BENCHMARKS:
        benchmark, most = BENCHMARKS[kind]
        parts = spec.split(":")
        n = parts[2] if len(parts) == 3 else "256"
        if len(parts) not in (2, 3) or parts[1] not in SPLITS or not n.isdigit() or int(n) < 1:
            raise ValueError(
                f"Expected a spec '{kind}:SPLIT' or '{kind}:SPLIT:N' with SPLIT in {SPLITS} and "
                f"N >= 1, but got {spec!r}."
            )
        if size[0] != size[1]:
            raise ValueError(f"Expected a model with square inputs for {spec!r}, but got {size}.")
        num_classes = getattr(model, "num_classes", None)
        if not isinstance(num_classes, int) or not 2 <= num_classes <= most:
            raise ValueError(
                f"Expected a model with 2 to {most} classes for {spec!r}, "
                f"but it has {num_classes!r}."
            )
        return benchmark(
            parts[1], n=int(n), size=size[0], num_classes=num_classes, mean=mean, std=std
        )
    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Expected a data folder or a 'shapes:SPLIT' / 'scenes:SPLIT' spec, but got {spec!r}."
        )
    check_choice("preprocessing", preprocessing, PREPROCESSING)
    pre = (
        Preprocessing.from_model(model)
        if preprocessing == "model"
        else Preprocessing.robustvit(size[0])
    )
    if (root / METADATA).is_file():  # Waterbirds: its test split, CUB's masks when beside it
        segmentations = root.parent / "CUB_200_2011" / "segmentations"
        masks_root = segmentations if masks and segmentations.is_dir() else None
        return Waterbirds(root, "test", masks=masks_root, train=False, preprocessing=pre)
    if classes is None and getattr(model, "num_classes", None) == 1000:
        split = root / "images" if (root / "images").is_dir() else root
        classes = detect_label_space(root, sorted(d.name for d in split.iterdir() if d.is_dir()))
    if (root / "images").is_dir():
        mask_format = detect_mask_format(root / "masks")
        return MaskedImageFolder(
            root, train=False, preprocessing=pre, classes=classes, mask_format=mask_format
        )
    if masks:
        raise ValueError(
            f"Expected the masked split {spec!r} to hold images/<class>/ (and masks/<class>/), "
            "but it has no images/ folder."
        )
    return OODImageFolder(root, classes=classes, scoring=scoring, preprocessing=pre)
