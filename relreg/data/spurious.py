"""``SpuriousShapes``: the built-in CPU benchmark with a spurious cue, as a Dataset or image folder.

The class is given only by the shape of a foreground object (exact masks); the background tint
agrees with the class with probability ``spurious`` (0.95) in the ``train``, ``val`` and ``test``
splits, is uninformative in ``unbiased`` (probability 1 / num_classes) and always points to a wrong
class in ``ood``. A model that leans on the tint loses accuracy on ``ood``; one that looks at the
shape does not. ``cue="marker"`` puts the cue in a white corner square instead (a local cue).
Deterministic from ``seed``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from relreg.data.folders import MaskedImageFolder
from relreg.data.sample import Sample
from relreg.data.synthetic import SHAPES, make_shapes
from relreg.validate import check_choice

__all__ = ["SPLITS", "SpuriousShapes", "write_shapes_folder"]

SPLITS = ("unbiased", "train", "val", "test", "ood")


def _split_params(split: str, spurious: float, num_classes: int, seed: int) -> tuple[float, int]:
    check_choice("split", split, SPLITS)
    p = {"unbiased": 1.0 / num_classes, "ood": 0.0}.get(split, spurious)
    return p, seed * len(SPLITS) + SPLITS.index(split) + 1


class GeneratedSplit(Dataset):
    """What the generated benchmarks share: items from tensors (``images``, ``masks``, ``labels``)
    or from their cached image folder (``folder``), with the mask zeroed where ``has_mask`` is
    False. Where the cue of each image is known (``cues``), items carry ``group = label *
    num_cues + cue`` (label x the class the background cue points to) and :attr:`num_groups` is
    ``len(classes) * num_cues``: the groups where cue and label agree are the majority of a
    biased split, the others its minority."""

    has_mask: Tensor
    labels: Tensor
    classes: list[str]
    folder: MaskedImageFolder | None
    cues: Tensor | None = None
    num_cues: int = 0

    @property
    def groups(self) -> Tensor | None:
        """``(N,)`` every item's group, or None without known cues."""
        return None if self.cues is None else self.labels * self.num_cues + self.cues

    @property
    def num_groups(self) -> int | None:
        """How many groups the items' ``group`` ranges over, or None without known cues."""
        return None if self.cues is None else len(self.classes) * self.num_cues

    def _read_folder(self, root: Path, mean: list[float], std: list[float]) -> None:
        """Serve the items from the cached folder ``root`` (``labels`` in its file order)."""
        transform = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        self.folder = MaskedImageFolder(root, transform=transform, classes=self.classes)
        self.labels = torch.tensor([label for _, _, label in self.folder.samples])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        has = self.has_mask[index]
        if self.folder is not None:
            sample = self.folder[index]
            image = sample["image"]
            label = sample["label"]
            mask = sample["mask"]
        else:
            image = self.images[index]
            label = self.labels[index]
            mask = self.masks[index]
        sample: Sample = {
            "image": image,
            "label": label,
            "mask": mask if has else torch.zeros_like(mask),
            "has_mask": has,
        }
        if self.cues is not None:
            sample["group"] = label * self.num_cues + self.cues[index]
        return sample


class SpuriousShapes(GeneratedSplit):
    """Generated shapes with a spurious background cue, yielding :class:`relreg.data.Sample` dicts.

    Args:
        split: ``unbiased``, ``train``, ``val``, ``test`` or ``ood``.
        n: number of images.
        size: image size in pixels.
        num_classes: number of shape classes (2 to 6).
        spurious: cue agreement in ``train`` / ``val`` / ``test``.
        seed: base seed; every split has its own stream.
        masked_fraction: fraction of samples that carry their mask (``has_mask``); the rest train
            with the classification term only.
        mean, std: normalisation, one value or one per RGB channel (RobustViT: 0.5, 0.5).
        cue: ``"tint"`` (the background's colour) or ``"marker"`` (a white corner square, a local
            cue; :func:`relreg.data.make_shapes`).
        cache_dir: if set, the split is written there once as a real image folder
            (:func:`write_shapes_folder`) and read back through
            :class:`relreg.data.MaskedImageFolder`, PNG files and all.

    Example:
        >>> ds = SpuriousShapes("train", n=8)
        >>> sorted(ds[0]), ds[0]["image"].shape
        (['has_mask', 'image', 'label', 'mask'], torch.Size([3, 32, 32]))
    """

    def __init__(
        self,
        split: str = "train",
        n: int = 512,
        size: int = 32,
        num_classes: int = 4,
        spurious: float = 0.95,
        seed: int = 0,
        masked_fraction: float = 1.0,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        cache_dir: str | os.PathLike | None = None,
        cue: str = "tint",
    ) -> None:
        if not 0.0 <= masked_fraction <= 1.0:
            raise ValueError(f"Expected masked_fraction in [0, 1], but got {masked_fraction!r}.")
        mean = _per_channel("mean", mean)
        std = _per_channel("std", std)
        p, split_seed = _split_params(split, spurious, num_classes, seed)
        self.split = split
        self.classes = list(SHAPES[:num_classes])
        g = torch.Generator().manual_seed(split_seed)
        self.has_mask = torch.rand(n, generator=g) < masked_fraction
        self.folder: MaskedImageFolder | None = None
        if cache_dir is not None:
            name = f"{split}-n{n}-s{size}-c{num_classes}-p{spurious}-seed{seed}"
            name += "" if cue == "tint" else f"-{cue}"
            root = write_shapes_folder(
                Path(cache_dir) / name, split, n, size, num_classes, spurious, seed, cue
            )
            self._read_folder(root, mean, std)
            return
        batch = make_shapes(
            n, size=size, num_classes=num_classes, seed=split_seed, spurious=p, cue=cue
        )
        self.images = (batch.images - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
            3, 1, 1
        )
        self.masks = batch.masks
        self.labels = batch.labels
        self.cues = batch.cues
        self.num_cues = num_classes


def _per_channel(name: str, value: float | Sequence[float]) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3 or (name == "std" and min(values) <= 0):
        raise ValueError(
            f"Expected {name} a number or 3 numbers{' > 0' if name == 'std' else ''}, "
            f"but got {value!r}."
        )
    return values


def write_shapes_folder(
    root: str | os.PathLike,
    split: str = "train",
    n: int = 64,
    size: int = 32,
    num_classes: int = 4,
    spurious: float = 0.95,
    seed: int = 0,
    cue: str = "tint",
) -> Path:
    """Write a split as a real image folder (``images/<shape>/*.png`` and ``masks/<shape>/*.png``).

    The folder is built in a temporary directory and renamed into place; an existing folder made
    with the same arguments is reused (a cache), one made with other arguments is an error.

    Returns:
        ``root``, ready for :class:`relreg.data.MaskedImageFolder` (or ``root / "images"`` for
        :class:`relreg.data.OODImageFolder`).
    """
    meta = {
        "split": split,
        "n": n,
        "size": size,
        "num_classes": num_classes,
        "spurious": spurious,
        "seed": seed,
        **({} if cue == "tint" else {"cue": cue}),  # tint folders keep their earlier meta.json
    }

    def generate() -> tuple[Tensor, Tensor, Tensor, dict]:
        p, split_seed = _split_params(split, spurious, num_classes, seed)
        batch = make_shapes(
            n, size=size, num_classes=num_classes, seed=split_seed, spurious=p, cue=cue
        )
        return batch.images, batch.masks, batch.labels, {}

    return write_split_folder(root, meta, generate, SHAPES, what="shapes")


def write_split_folder(
    root: str | os.PathLike,
    meta: dict,
    generate: Callable[[], tuple[Tensor, Tensor, Tensor, dict]],
    names: Sequence[str],
    what: str,
) -> Path:
    """Write a generated split as ``images/<class>/*.png`` and ``masks/<class>/*.png``, once.

    The folder is built in a temporary directory and renamed into place, so an interrupted write
    leaves nothing behind; an existing folder whose ``meta.json`` equals ``meta`` is reused (a
    cache), one made with other arguments is an error and is left as it is.

    Args:
        root: the folder to write.
        meta: the arguments that made the split, stored as ``meta.json``.
        generate: called only when the folder is written; returns images ``(N, 3, H, W)`` in
            [0, 1], masks ``(N, H, W)`` in {0, 1}, labels ``(N,)`` and extra per-item lists
            written to ``items.json`` (in file-name order) when not empty.
        names: the class folder name of each label.
        what: the benchmark's name, for the error message.

    Returns:
        ``root``.

    Raises:
        FileExistsError: ``root`` exists and was not made with ``meta``.
    """
    root = Path(root)
    if root.exists():
        found = (
            json.loads((root / "meta.json").read_text()) if (root / "meta.json").is_file() else None
        )
        if found == meta:
            return root
        raise FileExistsError(
            f"Expected {str(root)!r} to be absent or a {what} folder made with {meta}, "
            f"but got {found}."
        )
    images, masks, labels, items = generate()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        for i in range(len(labels)):
            name = names[int(labels[i])]
            for kind in ("images", "masks"):
                (tmp / kind / name).mkdir(parents=True, exist_ok=True)
            pixels = (images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(tmp / "images" / name / f"{i:05d}.png")
            Image.fromarray((masks[i].numpy() * 255).astype(np.uint8)).save(
                tmp / "masks" / name / f"{i:05d}.png"
            )
        if items:
            (tmp / "items.json").write_text(json.dumps(items))
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root
