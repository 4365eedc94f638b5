"""Waterbirds in its native layout, with CUB's segmentations as foreground masks.

Sagawa et al., *Distributionally Robust Neural Networks for Group Shifts*, ICLR 2020: CUB birds
pasted onto Places backgrounds (``dataset_scripts/generate_waterbirds.py`` of kohpangwei/group_DRO).
``<root>/metadata.csv`` has the columns ``img_id,img_filename,y,split,place,place_filename``;
``split`` 0 / 1 / 2 is train / val / test, ``y = 1`` a waterbird, ``place = 1`` water, and the
group is ``2 * y + place`` (the training groups hold 3498 / 184 / 56 / 1057 images: landbirds on
land, landbirds on water, waterbirds on land, waterbirds on water). The birds were pasted with
CUB's masks, ``CUB_200_2011/segmentations/<img_filename with .png>``, at the bird image's own
size, so every image has an exact foreground mask; those masks are soft (values / 255) and are
binarised here at ``mask_threshold``. The field's metric is the worst-group accuracy
(:class:`relreg.metrics.GroupAccuracy`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from relreg.data.files import load_rgb
from relreg.data.preprocessing import FollowsModel, Preprocessing
from relreg.data.sample import Sample
from relreg.validate import check_choice

__all__ = ["METADATA", "WATERBIRDS_CLASSES", "WATERBIRDS_SPLITS", "Waterbirds"]

METADATA = "metadata.csv"
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
WATERBIRDS_CLASSES = ["landbird", "waterbird"]
_COLUMNS = ("img_filename", "y", "split", "place")


def _read_metadata(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected Waterbirds' {METADATA} at {str(path)!r} (the root is the folder "
            "waterbird_complete95_forest2water2), but it does not exist."
        )
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in _COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(
            f"Expected {str(path)!r} to have the columns {list(_COLUMNS)} and rows, but "
            f"{'it has no rows' if not rows else f'it lacks {missing}'}."
        )
    return rows


class Waterbirds(FollowsModel, Dataset):
    """One split of Waterbirds, yielding :class:`relreg.data.Sample` dicts with ``group``.

    Args:
        root: the folder with ``metadata.csv`` and the images
            (``waterbird_complete95_forest2water2``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        masks: CUB's segmentations folder (``CUB_200_2011/segmentations``) for foreground masks,
            matched by ``img_filename``; None: no masks (``has_mask`` False).
        mask_threshold: a soft mask's value (in [0, 1]) above which a pixel is foreground.
        train: random crop and flip (default: for the train split).
        preprocessing, img_size, mean, std, transform: as :class:`relreg.data.MaskedImageFolder`.

    Attributes:
        labels: ``(N,)`` y; places: ``(N,)`` place; groups: ``(N,)`` ``2 * y + place``.
        num_groups: 4. classes: ``["landbird", "waterbird"]``.
        files: the image paths, in metadata order.

    Example:
        >>> ds = Waterbirds("data/waterbird_complete95_forest2water2", "val",
        ...                 masks="data/CUB_200_2011/segmentations")  # doctest: +SKIP
    """

    num_groups = 4
    classes = WATERBIRDS_CLASSES

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        masks: str | os.PathLike | None = None,
        mask_threshold: float = 0.5,
        train: bool | None = None,
        preprocessing: str | Preprocessing = "model",
        img_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        transform: Callable | None = None,
    ) -> None:
        check_choice("split", split, tuple(WATERBIRDS_SPLITS))
        if isinstance(mask_threshold, bool) or not 0.0 <= float(mask_threshold) < 1.0:
            raise ValueError(f"Expected mask_threshold in [0, 1), but got {mask_threshold!r}.")
        self.root = Path(root)
        self.split = split
        self.masks_root = None if masks is None else Path(masks)
        if self.masks_root is not None and not self.masks_root.is_dir():
            raise FileNotFoundError(
                f"Expected CUB's segmentations folder {str(self.masks_root)!r} (masks=), but it "
                "does not exist."
            )
        self.mask_threshold = float(mask_threshold)
        self.train = split == "train" if train is None else bool(train)
        self._init_preprocessing(preprocessing, img_size, mean, std, transform)
        rows = [
            r
            for r in _read_metadata(self.root / METADATA)
            if int(r["split"]) == WATERBIRDS_SPLITS[split]
        ]
        if not rows:
            raise ValueError(f"Expected images of split {split!r} in {METADATA}, but it has none.")
        self.files = [self.root / r["img_filename"] for r in rows]
        missing = [p for p in self.files if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Expected the {len(self.files)} images of {METADATA}'s {split} split under "
                f"{str(self.root)!r}, but {len(missing)} are missing, e.g. {str(missing[0])!r}."
            )
        self.names = [r["img_filename"] for r in rows]
        self.labels = torch.tensor([int(r["y"]) for r in rows])
        self.places = torch.tensor([int(r["place"]) for r in rows])
        self.groups = 2 * self.labels + self.places

    def __len__(self) -> int:
        return len(self.files)

    def mask_path(self, index: int) -> Path | None:
        """CUB's segmentation of sample ``index``, or None without ``masks``."""
        if self.masks_root is None:
            return None
        return self.masks_root / Path(self.names[index]).with_suffix(".png")

    def _mask(self, index: int, size: tuple[int, int]) -> Tensor | None:
        path = self.mask_path(index)
        if path is None:
            return None
        if not path.is_file():
            raise FileNotFoundError(
                f"Expected the CUB segmentation {str(path)!r}, but it is missing."
            )
        with Image.open(path) as im:
            soft = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        if soft.shape != size:
            raise ValueError(
                f"Expected the segmentation {str(path)!r} of its image's size {size}, but got "
                f"{soft.shape}."
            )
        return torch.from_numpy((soft > self.mask_threshold).astype(np.uint8))

    def __getitem__(self, index: int) -> Sample:
        image = load_rgb(self.files[index])
        mask = self._mask(index, tuple(image.shape[-2:]))
        has = mask is not None
        if mask is None:
            mask = torch.zeros(image.shape[-2:], dtype=torch.uint8)
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return {
            "image": image.as_subclass(Tensor),
            "label": self.labels[index],
            "mask": mask.as_subclass(Tensor).float(),
            "has_mask": torch.tensor(has),
            "path": str(self.files[index]),
            "group": self.groups[index],
        }
