"""Image folders with foreground masks for fine-tuning, and out-of-distribution evaluation folders.

``MaskedImageFolder``: ``root/images/<class>/<name>.<ext>`` with optional
``root/masks/<class>/<name>.png`` (grey 0/1 or 0/255 masks, or ImageNet-S encoded masks where the
class is ``R + 256 * G``, 0 is background and 1000 "ignore"). ``OODImageFolder``: evaluation splits
laid out as ``<class>/<image>`` (ImageNet-A/R/Sketch/V2, ObjectNet-style), with folder names mapped
to the model's classes.

Both yield :class:`relreg.data.Sample` dicts (with ``"path"``; ObjectNet-style splits add
``"label_set"``).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from relreg.data.classes import ClassesLike, class_index, class_sets, split_classes_of
from relreg.data.files import (
    IMAGE_EXTENSIONS,
    MASK_FORMATS,
    _choose,
    _class_folders,
    _class_images,
    _unreadable,
    _warn_skipped,
    load_mask,
    load_rgb,
)
from relreg.data.preprocessing import FollowsModel, Preprocessing, imagenet_wnid_folders
from relreg.data.sample import Sample
from relreg.data.suites import resolve_suite
from relreg.metrics.accuracy import SCORINGS
from relreg.validate import check_choice, check_positive_int

__all__ = ["IMAGE_EXTENSIONS", "MaskedImageFolder", "OODImageFolder"]

log = logging.getLogger(__name__)


class MaskedImageFolder(FollowsModel, Dataset):
    """Images with optional foreground masks, for relevance-regularised fine-tuning.

    Args:
        root: folder with ``images/<class>/`` and optionally ``masks/<class>/``.
        train: random crop and flip (True) or resize and centre crop (False), unless ``transform``.
        preprocessing: ``"model"`` (the model's timm ``pretrained_cfg``, taken by
            :meth:`follow_model`; RobustViT's convention until then), ``"robustvit"`` (resize
            256 / 224 of ``img_size``, mean = std = 0.5) or a :class:`relreg.data.Preprocessing`.
        img_size, mean, std: override the preprocessing's crop size and normalisation.
        transform: a joint transform ``(tv_tensors.Image, tv_tensors.Mask) -> (image, mask)`` that
            replaces the presets.
        classes: label space (see :func:`class_index`; ``"imagenet"``: timm's 1000 wnids in model
            order, the setting for ImageNet-S folders and a 1000-class model).
        per_class: keep at most this many images per class (the paper: 3), chosen with ``seed``
            from the sorted file list, so the choice does not depend on the file system.
        seed: seed of the per-class choice.
        mask_format: ``"binary"`` or ``"imagenet_s"``.
        masked_only: keep only images that have a mask.
        skip_corrupt: decode every chosen image and mask once at construction and drop the
            samples whose files PIL cannot read (truncated, not an image), with one warning; a
            dropped sample is replaced by another of its class when ``per_class`` is set. False:
            such a file raises a ``ValueError`` naming it when it is read.

    Attributes:
        samples: ``(image_path, mask_path or None, label)`` in a fixed order.
        num_without_mask: how many images have no mask (they train with the classification term
            only).
        skipped: the unreadable files dropped by ``skip_corrupt``.

    Example:
        >>> ds = MaskedImageFolder("data/shapes/train", img_size=32)  # doctest: +SKIP
        >>> ds[0]["image"].shape, ds[0]["mask"].shape, ds[0]["has_mask"]  # doctest: +SKIP
        (torch.Size([3, 32, 32]), torch.Size([32, 32]), True)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        img_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        transform: Callable | None = None,
        classes: ClassesLike = None,
        preprocessing: str | Preprocessing = "model",
        per_class: int | None = None,
        seed: int = 0,
        mask_format: str = "binary",
        masked_only: bool = False,
        skip_corrupt: bool = False,
    ) -> None:
        check_choice("mask_format", mask_format, MASK_FORMATS)
        check_positive_int("per_class", per_class, allow_none=True)
        self.root = Path(root)
        self.train = bool(train)
        self.mask_format = mask_format
        self._init_preprocessing(preprocessing, img_size, mean, std, transform)
        image_root = self.root / "images"
        mask_root = self.root / "masks"
        folders = _class_folders(image_root, "images")
        self._imagenet_folders = imagenet_wnid_folders(folders, classes)
        self.class_to_idx = class_index(folders, classes)
        files = _class_images(image_root, folders)
        on_disk = {(name, p.stem) for name in folders for p in files[name]}
        self.samples: list[tuple[Path, Path | None, int]] = []
        self.skipped: list[Path] = []
        for name in folders:
            entries = [
                (p, _mask_for(mask_root / name, p.stem), self.class_to_idx[name])
                for p in files[name]
            ]
            if masked_only:
                entries = [e for e in entries if e[1] is not None]
            check = _unreadable if skip_corrupt else None
            chosen, bad = _choose(entries, per_class, f"{seed}/{name}", check)
            self.samples += chosen
            self.skipped += bad
        if not self.samples:
            raise ValueError(
                f"Expected usable images under {str(self.root)!r} (masked_only={masked_only}), "
                f"but found none ({len(self.skipped)} unreadable)."
            )
        _warn_skipped(self.root, self.skipped)
        self.num_without_mask = sum(m is None for _, m, _ in self.samples)
        orphans = _orphan_masks(mask_root, on_disk)
        if orphans:
            warnings.warn(
                f"{orphans} masks under {str(mask_root)!r} have no image; they are ignored.",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.samples)

    def _relabel_imagenet(self) -> bool:
        if not self._imagenet_folders:
            return False
        self._imagenet_folders = False
        self.class_to_idx = class_index(sorted(self.class_to_idx), "imagenet")
        self.samples = [(p, m, self.class_to_idx[p.parent.name]) for p, m, _ in self.samples]
        log.info("%s: wnid folders mapped to timm's ImageNet-1k order.", self.root)
        return True

    def __getitem__(self, index: int) -> Sample:
        path, mask_path, label = self.samples[index]
        image = load_rgb(path)
        if mask_path is None:
            mask = torch.zeros(image.shape[-2:], dtype=torch.uint8)
        else:
            mask = load_mask(mask_path, self.mask_format)
            if mask.shape != image.shape[-2:]:
                raise ValueError(
                    f"Expected mask {str(mask_path)!r} of its image's size "
                    f"{tuple(image.shape[-2:])}, but got {tuple(mask.shape)}."
                )
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return {
            "image": image.as_subclass(Tensor),
            "label": torch.tensor(label, dtype=torch.long),
            "mask": mask.as_subclass(Tensor).float(),
            "has_mask": torch.tensor(mask_path is not None),
            "path": str(path),
        }


def _mask_for(folder: Path, stem: str) -> Path | None:
    p = folder / f"{stem}.png"
    return p if p.is_file() else None


def _orphan_masks(mask_root: Path, images: set[tuple[str, str]]) -> int:
    if not mask_root.is_dir():
        return 0
    return sum(1 for p in mask_root.glob("*/*.png") if (p.parent.name, p.stem) not in images)


class OODImageFolder(FollowsModel, Dataset):
    """An evaluation split laid out as ``root/<class>/<image>``.

    Args:
        root: the split's folder.
        classes: the model's label space (list of names in label order, or ``{name: index}``); the
            split's folders must be in it (ImageNet-A/R use 200 of the 1000 wnids). A label space
            timm ships, by name: ``"imagenet"`` (wnid folders), ``"imagenet-a"`` / ``"imagenet-r"``
            (their 200 wnids; restricted scoring then uses all 200), ``"imagenet-v2"`` (folders
            named by class index), ``"objectnet"`` (ObjectNet's own ``mappings/`` files; only the
            folders that overlap ImageNet-1k are read), ``"si-score"`` (SI-Score's object-name
            folders); see :mod:`relreg.data.suites`.
            None: sorted folder names. ``{name: [index, ...]}`` (or a ``.json`` file of it) for
            splits whose classes stand for several model classes (ObjectNet): a prediction of any
            of them is right; samples then carry ``label_set`` (see
            :func:`relreg.metrics.accuracy_targets`).
        img_size, mean, std: override the preprocessing's crop size and normalisation.
        transform: replaces the preprocessing (called on ``tv_tensors.Image``).
        scoring: ``"argmax"`` (RobustViT: argmax over all the model's classes) or ``"restricted"``
            (argmax over the split's classes only, the common ImageNet-A/R protocol).
        crop_border: pixels cut from every side before the transform (None: 1 for ObjectNet,
            whose images carry a 1-pixel border, else 0).
        skip_corrupt: decode every image once at construction and drop those PIL cannot read
            (truncated, not an image), with one warning. False: such a file raises a
            ``ValueError`` naming it when it is read.
        preprocessing: ``"model"`` (the default: the model's timm ``pretrained_cfg``, taken by
            :meth:`follow_model`), ``"robustvit"`` or a :class:`relreg.data.Preprocessing`.

    Attributes:
        split_classes: ``(C_split,)`` long, the model indices of the split's classes (all of them,
            for many-to-many mappings).
        class_sets: ``{folder: (index, ...)}``.
        skipped: the unreadable files dropped by ``skip_corrupt``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: ClassesLike = None,
        img_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        transform: Callable | None = None,
        scoring: str = "argmax",
        skip_corrupt: bool = False,
        crop_border: int | None = None,
        preprocessing: str | Preprocessing = "model",
    ) -> None:
        check_choice("scoring", scoring, SCORINGS)
        self.root = Path(root)
        self.scoring = scoring
        self._init_preprocessing(preprocessing, img_size, mean, std, transform)
        folders = _class_folders(self.root, "OOD split")
        # ObjectNet / SI-Score by name: their own mapping files or class names
        classes, folders, border = resolve_suite(classes, self.root, folders)
        if crop_border is not None and (type(crop_border) is not int or crop_border < 0):
            raise ValueError(f"Expected crop_border an int >= 0 or None, but got {crop_border!r}.")
        self.crop_border = border if crop_border is None else int(crop_border)
        self._imagenet_folders = imagenet_wnid_folders(folders, classes)
        self._set_classes(folders, classes)
        files = _class_images(self.root, folders)
        entries = [(p, self.class_to_idx[name]) for name in folders for p in files[name]]
        self._folder_of = {p: name for name in folders for p in files[name]}
        check = _unreadable if skip_corrupt else None
        self.samples, self.skipped = _choose(entries, check=check)
        if not self.samples:
            raise ValueError(
                f"Expected readable images under {str(self.root)!r}, but all "
                f"{len(self.skipped)} are unreadable."
            )
        _warn_skipped(self.root, self.skipped)

    def _set_classes(self, folders: Sequence[str], classes: ClassesLike) -> None:
        self.class_sets = class_sets(folders, classes)
        self.class_to_idx = {name: s[0] for name, s in self.class_sets.items()}
        width = max(len(s) for s in self.class_sets.values())
        # (B, width) label sets padded with -1, only for many-to-many mappings (ObjectNet)
        self._label_sets = (
            {
                name: torch.tensor([*s, *[-1] * (width - len(s))], dtype=torch.long)
                for name, s in self.class_sets.items()
            }
            if width > 1
            else None
        )
        subset = split_classes_of(classes)  # ImageNet-A/R by name: all 200, present or not
        self.split_classes = torch.tensor(
            subset or sorted({i for s in self.class_sets.values() for i in s}), dtype=torch.long
        )

    def _relabel_imagenet(self) -> bool:
        if not self._imagenet_folders:
            return False
        self._imagenet_folders = False
        self._set_classes(sorted(self.class_sets), "imagenet")
        self.samples = [(p, self.class_to_idx[self._folder_of[p]]) for p, _ in self.samples]
        log.info("%s: wnid folders mapped to timm's ImageNet-1k order.", self.root)
        return True

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.samples[index]
        image = load_rgb(path)
        b = self.crop_border
        image = image[:, b:-b, b:-b] if b else image
        image = self.transform(tv_tensors.Image(image)).as_subclass(Tensor)
        sample = {
            "image": image,
            "label": torch.tensor(label, dtype=torch.long),
            "mask": torch.zeros(image.shape[-2:]),
            "has_mask": torch.tensor(False),
            "path": str(path),
        }
        if self._label_sets is not None:
            sample["label_set"] = self._label_sets[self._folder_of[path]]
        return sample
