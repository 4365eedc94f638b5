"""The ImageNet-9 backgrounds challenge in its native layout: eight variations of one validation
set, with the objects' foreground masks, scored for 9-way and 1000-way models.

Xiao, Engstrom, Ilyas & Madry, *Noise or Signal: The Role of Image Backgrounds in Object
Recognition*, ICLR 2021 (MadryLab/backgrounds_challenge: ``tools/datasets.py``, ``in9_eval.py``,
``tools/model_utils.py``). The layout is ``<root>/<variation>/val/<class>/*.JPEG`` for the
variations :data:`VARIATIONS`, the foreground masks ``<root>/fg_mask/val/<class>/<stem>.npy``,
and the classes ``00_dog`` ... ``08_fish`` (two of the names contain a space), labelled by their
sorted order. A 1000-class model is scored as the challenge scores it: the 1000-way argmax,
mapped to the 9 classes through ``in_to_in9.json`` (all 1000 ImageNet indices as string keys,
values 0-8 or -1); a prediction of an unmapped class is wrong. relreg expresses that as label
sets: each sample's ``label_set`` holds the ImageNet classes of its IN-9 class, and a 1000-way
argmax is right when it is one of them (:func:`relreg.metrics.accuracy_targets`), which is the
same rule. The headline metric is the **BG-gap**, accuracy on ``mixed_same`` minus accuracy on
``mixed_rand`` (:func:`bg_gap`).

Every variation keeps the object where it was in the original image (the mixed variations paste
the same foreground onto other backgrounds; the background-only ones remove it), so the original's
foreground mask is each variation's mask: where the object is, or was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import tv_tensors

from relreg.data.files import IMAGE_EXTENSIONS, load_rgb
from relreg.data.preprocessing import FollowsModel, Preprocessing
from relreg.data.sample import Sample
from relreg.validate import check_choice

__all__ = [
    "IN9_CLASSES",
    "IN9_MAPPING",
    "VARIATIONS",
    "ImageNet9",
    "bg_gap",
    "expand_imagenet9",
    "in9_label_sets",
    "is_imagenet9",
]

VARIATIONS = (
    "original",
    "only_bg_b",
    "only_bg_t",
    "no_fg",
    "only_fg",
    "mixed_same",
    "mixed_rand",
    "mixed_next",
)
IN9_CLASSES = (
    "00_dog",
    "01_bird",
    "02_wheeled vehicle",
    "03_reptile",
    "04_carnivore",
    "05_insect",
    "06_musical instrument",
    "07_primate",
    "08_fish",
)
IN9_MAPPING = "in_to_in9.json"


def in9_label_sets(mapping: str | os.PathLike) -> list[list[int]]:
    """The ImageNet-1k classes of each IN-9 class, read from ``in_to_in9.json``.

    Raises:
        FileNotFoundError: the file is missing (named, with where it ships).
        ValueError: the file is not a mapping of the 1000 indices to -1 ... 8.
    """
    path = Path(mapping)
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected the challenge's {IN9_MAPPING} at {str(path)!r} (it ships with the data and "
            "with MadryLab/backgrounds_challenge; pass mapping=), but it does not exist; a 9-way "
            "model needs none (num_classes=9)."
        )
    table = json.loads(path.read_text())
    if not isinstance(table, Mapping) or sorted(map(int, table)) != list(range(1000)):
        raise ValueError(
            f"Expected {str(path)!r} to map the 1000 ImageNet indices, but it does not."
        )
    sets: list[list[int]] = [[] for _ in IN9_CLASSES]
    for index, target in sorted(table.items(), key=lambda kv: int(kv[0])):
        if not -1 <= int(target) < len(IN9_CLASSES):
            raise ValueError(f"Expected values -1 ... 8 in {str(path)!r}, but got {target!r}.")
        if int(target) >= 0:
            sets[int(target)].append(int(index))
    return sets


def bg_gap(accuracies: Mapping[str, float]) -> float:
    """The challenge's BG-gap: accuracy on ``mixed_same`` minus accuracy on ``mixed_rand``.

    Example:
        >>> round(bg_gap({"mixed_same": 0.862, "mixed_rand": 0.789}), 3)
        0.073
    """
    missing = [v for v in ("mixed_same", "mixed_rand") if v not in accuracies]
    if missing:
        raise ValueError(f"Expected accuracies of mixed_same and mixed_rand, but {missing} lack.")
    return float(accuracies["mixed_same"]) - float(accuracies["mixed_rand"])


class ImageNet9(FollowsModel, Dataset):
    """One variation of the ImageNet-9 backgrounds challenge, yielding :class:`relreg.data.Sample`
    dicts with the object's foreground mask.

    Args:
        root: the challenge's folder (``bg_challenge``: ``original/``, ``mixed_rand/``, ...,
            ``fg_mask/``).
        variation: one of :data:`VARIATIONS`.
        num_classes: the model's outputs: 9 (labels are the folder indices) or 1000 (samples
            carry ``label_set``: the ImageNet classes of their IN-9 class, from ``mapping``).
        mapping: ``in_to_in9.json`` (default: ``<root>/in_to_in9.json``); only for 1000 classes.
        masks: read ``fg_mask/val`` as foreground masks (images without one have none).
        preprocessing, img_size, mean, std, transform: as :class:`relreg.data.MaskedImageFolder`
            (evaluation transforms).

    Attributes:
        files: the images, sorted by class then name. labels: ``(N,)`` IN-9 indices.
        classes: the 9 folder names. scoring: ``"argmax"``.

    Example:
        >>> ds = ImageNet9("data/bg_challenge", "mixed_rand")  # doctest: +SKIP
    """

    classes = list(IN9_CLASSES)
    scoring = "argmax"

    def __init__(
        self,
        root: str | os.PathLike,
        variation: str = "original",
        num_classes: int = 1000,
        mapping: str | os.PathLike | None = None,
        masks: bool = True,
        preprocessing: str | Preprocessing = "model",
        img_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        transform: Callable | None = None,
    ) -> None:
        check_choice("variation", variation, VARIATIONS)
        check_choice("num_classes", num_classes, (9, 1000))
        self.root = Path(root)
        self.variation = variation
        self.num_classes = num_classes
        self.train = False
        self._init_preprocessing(preprocessing, img_size, mean, std, transform)
        folder = self.root / variation / "val"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Expected the variation folder {str(folder)!r} (<root>/<variation>/val/<class>/), "
                "but it does not exist."
            )
        found = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if found != list(IN9_CLASSES):
            raise ValueError(
                f"Expected the 9 class folders {list(IN9_CLASSES)} in {str(folder)!r}, but got "
                f"{found}."
            )
        self.files: list[Path] = []
        labels = []
        for index, name in enumerate(IN9_CLASSES):
            images = sorted(p for p in (folder / name).iterdir() if p.suffix in IMAGE_EXTENSIONS)
            self.files += images
            labels += [index] * len(images)
        if not self.files:
            raise ValueError(f"Expected images under {str(folder)!r}, but found none.")
        self.labels = torch.tensor(labels)
        self.masks_root = self.root / "fg_mask" / "val" if masks else None
        self._label_sets = None
        if num_classes == 1000:
            sets = in9_label_sets(mapping or self.root / IN9_MAPPING)
            width = max(len(s) for s in sets)
            self._label_sets = torch.tensor([s + [-1] * (width - len(s)) for s in sets])

    def __len__(self) -> int:
        return len(self.files)

    def _mask(self, path: Path, size: tuple[int, int]) -> Tensor | None:
        if self.masks_root is None:
            return None
        file = self.masks_root / path.parent.name / f"{path.stem}.npy"
        if not file.is_file():
            return None
        array = np.load(file)
        if array.ndim == 3:  # (H, W, C) masks: foreground where any channel is set
            array = array.any(-1)
        if array.shape != size:
            raise ValueError(
                f"Expected the mask {str(file)!r} of its image's size {size}, but got "
                f"{array.shape}."
            )
        return torch.from_numpy((array > 0).astype(np.uint8))

    def __getitem__(self, index: int) -> Sample:
        path = self.files[index]
        image = load_rgb(path)
        mask = self._mask(path, tuple(image.shape[-2:]))
        has = mask is not None
        if mask is None:
            mask = torch.zeros(image.shape[-2:], dtype=torch.uint8)
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        label = int(self.labels[index])
        sample: Sample = {
            "image": image.as_subclass(Tensor),
            "label": torch.tensor(label),
            "mask": mask.as_subclass(Tensor).float(),
            "has_mask": torch.tensor(has),
            "path": str(path),
        }
        if self._label_sets is not None:
            label_set = self._label_sets[label]
            sample["label"] = label_set[0].clone()  # a class of the set: the label of record
            sample["label_set"] = label_set
        return sample


def is_imagenet9(root: str | os.PathLike) -> bool:
    """Whether ``root`` is laid out as the challenge (``mixed_same/val`` and ``mixed_rand/val``)."""
    path = Path(root)
    return all((path / v / "val").is_dir() for v in ("mixed_same", "mixed_rand"))


def expand_imagenet9(
    name: str, root: str | os.PathLike, model: nn.Module, preprocessing: str = "model"
) -> dict[str, ImageNet9]:
    """Every variation under ``root`` as an evaluation split named ``<name>/<variation>``, for
    ``model`` (9 or 1000 classes), preprocessed as :func:`relreg.data.load_split` would."""
    from relreg.data.preprocessing import PREPROCESSING
    from relreg.models import model_data_config

    check_choice("preprocessing", preprocessing, PREPROCESSING)
    num_classes = getattr(model, "num_classes", None)
    if num_classes not in (9, 1000):
        raise ValueError(
            f"Expected a model with 9 or 1000 classes for the ImageNet-9 splits of "
            f"{str(root)!r}, but it has {num_classes!r}."
        )
    pre = (
        Preprocessing.from_model(model)
        if preprocessing == "model"
        else Preprocessing.robustvit(model_data_config(model)[0][0])
    )
    return {
        f"{name}/{variation}": ImageNet9(root, variation, num_classes, preprocessing=pre)
        for variation in VARIATIONS
        if (Path(root) / variation / "val").is_dir()
    }
