"""Image folders with foreground masks for fine-tuning, and out-of-distribution evaluation folders.

``MaskedImageFolder``: ``root/images/<class>/<name>.<ext>`` with optional
``root/masks/<class>/<name>.png`` (grey 0/1 or 0/255 masks, or ImageNet-S encoded masks where the
class is ``R + 256 * G``, 0 is background and 1000 "ignore"). ``OODImageFolder``: evaluation splits
laid out as ``<class>/<image>`` (ImageNet-A/R/Sketch/V2, ObjectNet-style), with folder names mapped
to the model's classes.

Both yield the batch contract of relreg: ``{"image": (3, H, W) float, "label": long,
"mask": (H, W) float in {0, 1}, "has_mask": bool, "path": str}``.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from relreg.data.transforms import eval_transform, train_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "MaskedImageFolder",
    "OODImageFolder",
    "class_index",
    "restrict_logits",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")
MASK_FORMATS = ("binary", "imagenet_s")


# str first: jsonargparse tries the types in order, and a path must not become a list of characters
ClassesLike = str | os.PathLike | Mapping[str, int] | Sequence[str] | None


def class_index(folders: Sequence[str], classes: ClassesLike) -> dict[str, int]:
    """Map folder names to class indices.

    Args:
        folders: the class folder names found on disk.
        classes: None (sorted folder names -> 0..C-1), a list of names in the model's label order
            (e.g. the 1000 ImageNet wnids), a text file with one such name per line, or an explicit
            ``{name: index}`` mapping.

    Raises:
        ValueError: a folder that the given label space does not contain.
        FileNotFoundError: a class file that does not exist.
    """
    if isinstance(classes, str | os.PathLike):
        path = Path(classes)
        if not path.is_file():
            raise FileNotFoundError(
                f"Expected a class file with one name per line, but {str(path)!r} does not exist."
            )
        classes = path.read_text().split()
    if classes is None:
        return {name: i for i, name in enumerate(sorted(folders))}
    if isinstance(classes, Mapping):
        mapping = dict(classes)
    else:
        mapping = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(folders) - set(mapping))
    if unknown:
        raise ValueError(
            f"Expected class folders from the given label space, but got unknown folders {unknown[:5]}."
        )
    return {name: mapping[name] for name in sorted(folders)}


def _class_folders(root: Path, what: str) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"Expected {what} folder {str(root)!r}, but it does not exist.")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not folders:
        raise ValueError(f"Expected class folders in {str(root)!r}, but found none.")
    return folders


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_EXTENSIONS)


def load_rgb(path: Path) -> Tensor:
    """Read an image file as a ``(3, H, W)`` uint8 tensor (grey and RGBA are converted to RGB)."""
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Could not read {str(path)!r} as an image: {err}") from err


def load_mask(path: Path, fmt: str = "binary") -> Tensor:
    """Read a mask file as an ``(H, W)`` uint8 tensor in {0, 1}.

    ``binary``: a grey image with values in {0, 1} or {0, 255}. ``imagenet_s``: RGB where the class
    is ``R + 256 * G``; 0 (background) and 1000 (ignore) are 0, any other class is foreground.
    """
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB") if fmt == "imagenet_s" else im.convert("L")).astype(
                np.int64
            )
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Could not read mask {str(path)!r}: {err}") from err
    if fmt == "imagenet_s":
        ids = arr[..., 0] + 256 * arr[..., 1]
        return torch.from_numpy(((ids != 0) & (ids != 1000)).astype(np.uint8))
    values = set(np.unique(arr).tolist())
    if not (values <= {0, 1} or values <= {0, 255}):
        raise ValueError(
            f"Expected mask values in {{0, 1}} or {{0, 255}} in {str(path)!r}, but got {sorted(values)[:6]}."
        )
    return torch.from_numpy((arr > 0).astype(np.uint8))


class MaskedImageFolder(Dataset):
    """Images with optional foreground masks, for relevance-regularised fine-tuning.

    Args:
        root: folder with ``images/<class>/`` and optionally ``masks/<class>/``.
        train: random crop and flip (True) or resize and centre crop (False), unless ``transform``.
        img_size: output size of the presets.
        mean, std: normalisation of the presets (RobustViT: 0.5, 0.5).
        transform: a joint transform ``(tv_tensors.Image, tv_tensors.Mask) -> (image, mask)`` that
            replaces the presets.
        classes: label space (see :func:`class_index`).
        per_class: keep at most this many images per class (the paper: 3), chosen with ``seed``
            from the sorted file list, so the choice does not depend on the file system.
        seed: seed of the per-class choice.
        mask_format: ``"binary"`` or ``"imagenet_s"``.
        masked_only: keep only images that have a mask.

    Attributes:
        samples: ``(image_path, mask_path or None, label)`` in a fixed order.
        num_without_mask: how many images have no mask (they train with the classification term only).

    Example:
        >>> ds = MaskedImageFolder("data/shapes/train", img_size=32)  # doctest: +SKIP
        >>> ds[0]["image"].shape, ds[0]["mask"].shape, ds[0]["has_mask"]  # doctest: +SKIP
        (torch.Size([3, 32, 32]), torch.Size([32, 32]), True)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        img_size: int = 224,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        transform: Callable | None = None,
        classes: ClassesLike = None,
        per_class: int | None = None,
        seed: int = 0,
        mask_format: str = "binary",
        masked_only: bool = False,
    ) -> None:
        if mask_format not in MASK_FORMATS:
            raise ValueError(
                f"Expected mask_format one of {MASK_FORMATS}, but got {mask_format!r}."
            )
        if per_class is not None and (not isinstance(per_class, int) or per_class < 1):
            raise ValueError(f"Expected per_class an int >= 1 or None, but got {per_class!r}.")
        self.root = Path(root)
        self.mask_format = mask_format
        self.transform = transform or (train_transform if train else eval_transform)(
            img_size, mean, std
        )
        image_root, mask_root = self.root / "images", self.root / "masks"
        folders = _class_folders(image_root, "images")
        self.class_to_idx = class_index(folders, classes)
        self.samples: list[tuple[Path, Path | None, int]] = []
        on_disk: set[tuple[str, str]] = set()
        for name in folders:
            files = _images_in(image_root / name)
            on_disk.update((name, p.stem) for p in files)
            if not files:
                raise ValueError(
                    f"Expected images in class folder {str(image_root / name)!r}, but it is empty."
                )
            entries = [
                (p, _mask_for(mask_root / name, p.stem), self.class_to_idx[name]) for p in files
            ]
            if masked_only:
                entries = [e for e in entries if e[1] is not None]
            if per_class is not None and len(entries) > per_class:
                entries = sorted(random.Random(f"{seed}/{name}").sample(entries, per_class))
            self.samples += entries
        if not self.samples:
            raise ValueError(
                f"Expected images with masks under {str(self.root)!r}, but found none."
            )
        self.num_without_mask = sum(m is None for _, m, _ in self.samples)
        orphans = _orphan_masks(mask_root, on_disk)
        if orphans:
            warnings.warn(
                f"{orphans} masks under {str(mask_root)!r} have no image; they are ignored.",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, mask_path, label = self.samples[index]
        image = load_rgb(path)
        if mask_path is None:
            mask = torch.zeros(image.shape[-2:], dtype=torch.uint8)
        else:
            mask = load_mask(mask_path, self.mask_format)
            if mask.shape != image.shape[-2:]:
                raise ValueError(
                    f"Expected mask {str(mask_path)!r} of its image's size {tuple(image.shape[-2:])}, "
                    f"but got {tuple(mask.shape)}."
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


class OODImageFolder(Dataset):
    """An evaluation split laid out as ``root/<class>/<image>``.

    Args:
        root: the split's folder.
        classes: the model's label space (list of names in label order, or ``{name: index}``); the
            split's folders must be in it (ImageNet-A/R use 200 of the 1000 wnids). None: sorted
            folder names.
        img_size, mean, std: the eval preset.
        transform: replaces the preset (called on ``tv_tensors.Image``).
        scoring: ``"argmax"`` (RobustViT: argmax over all the model's classes) or ``"restricted"``
            (argmax over the split's classes only, the common ImageNet-A/R protocol).

    Attributes:
        split_classes: ``(C_split,)`` long, the model indices of the split's classes.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: ClassesLike = None,
        img_size: int = 224,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        transform: Callable | None = None,
        scoring: str = "argmax",
    ) -> None:
        if scoring not in ("argmax", "restricted"):
            raise ValueError(f"Expected scoring 'argmax' or 'restricted', but got {scoring!r}.")
        self.root, self.scoring = Path(root), scoring
        self.transform = transform or eval_transform(img_size, mean, std)
        folders = _class_folders(self.root, "OOD split")
        self.class_to_idx = class_index(folders, classes)
        self.samples = [
            (p, self.class_to_idx[name]) for name in folders for p in _images_in(self.root / name)
        ]
        if not self.samples:
            raise ValueError(f"Expected images under {str(self.root)!r}, but found none.")
        self.split_classes = torch.tensor(sorted(set(self.class_to_idx.values())), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        image = self.transform(tv_tensors.Image(load_rgb(path))).as_subclass(Tensor)
        return {
            "image": image,
            "label": torch.tensor(label, dtype=torch.long),
            "mask": torch.zeros(image.shape[-2:]),
            "has_mask": torch.tensor(False),
            "path": str(path),
        }


def restrict_logits(logits: Tensor, classes: Tensor) -> Tensor:
    """Logits ``(B, K)`` with every class outside ``classes`` set to -inf (restricted scoring)."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[classes.to(logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))
