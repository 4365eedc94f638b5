"""RobustViT's ImageNet-S train and validation subsets, reproducibly, as a MaskedImageFolder tree.

ImageNet-S (Gao et al., "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022) ships masks as
``<split>/<wnid>/<name>.png`` (``train-semi-segmentation``: 10 masked images per class of the 919);
the images are ImageNet's own ``train/<wnid>/<name>.JPEG``. A mask's class id is ``R + 256 * G``;
0 is background and 1000 "ignore".

RobustViT (Chefer, Schwartz & Wolf, NeurIPS 2022; ``segmentation_dataset.py`` and
``imagenet_finetune.py`` of hila-chefer/RobustViT) selects: the class folders of the mask split in
``os.listdir`` order, without the ten wnids of ImageNet-S's merged classes (``MERGED_WNIDS``; five
of them are folders of the 919 split, so 914 classes remain), optionally shuffled with a seed; the
first 500 classes for training and the rest (414) for validation; the first ``num_samples`` files
of each class (3 for training; 1 for validation), again in ``os.listdir`` order. Masks are binarised
as ignore (1000) -> background and any other non-zero id -> foreground; their code asserts that a
mask holds exactly one such id.

relreg differs in one deliberate way: ``os.listdir`` order depends on the file system, so the
paper's subset cannot be reproduced exactly on another machine; relreg sorts every listing (and
shuffles the sorted class list with ``random.Random(class_seed)`` when a seed is given), so the
same tree always gives the same subset. A mask with several class ids is kept (all ids count as
foreground, as the paper's binarisation does) and counted in the selection's report instead of
stopping the run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from relreg.validate import check_choice, check_positive_int

__all__ = [
    "MERGED_WNIDS",
    "imagenet_s_files",
    "imagenet_s_selection",
    "prepare_imagenet_s",
    "write_imagenet_s_subset",
]

# ImageNet-S merges n04356056 -> n04355933, n04493381 -> n02808440, n03642806 -> n03832673,
# n04008634 -> n03773504, n03887697 -> n15075141; RobustViT skips all ten wnids.
MERGED_WNIDS = frozenset(
    {
        "n04356056", "n04355933", "n04493381", "n02808440", "n03642806",
        "n03832673", "n04008634", "n03773504", "n03887697", "n15075141",
    }
)  # fmt: skip
PARTITIONS = ("train", "val")


def imagenet_s_selection(
    masks: str | os.PathLike,
    partition: str = "train",
    num_samples: int | None = None,
    train_classes: int = 500,
    class_seed: int | None = None,
) -> list[tuple[str, str]]:
    """``(wnid, file stem)`` pairs of RobustViT's subset, in a file-system-independent order.

    Args:
        masks: ImageNet-S's mask split, ``<masks>/<wnid>/<name>.png`` (e.g.
            ``ImageNetS919/train-semi-segmentation``).
        partition: ``"train"`` (the first ``train_classes`` classes) or ``"val"`` (the rest).
        num_samples: files per class (None: 3 for ``"train"``, 1 for ``"val"``, the paper's).
        train_classes: classes in the training partition (the paper: 500).
        class_seed: shuffle the sorted class list with this seed first (RobustViT's
            ``--class_seed``); None keeps the sorted order (RobustViT also treats 0 as "no
            shuffle"; here 0 is a seed like any other).

    Raises:
        ValueError: for a bad argument, a split without class folders, or a partition that
            would be empty (e.g. ``"val"`` with ``train_classes`` >= the classes found).
        FileNotFoundError: when ``masks`` is not a folder.
    """
    check_choice("partition", partition, PARTITIONS)
    check_positive_int("num_samples", num_samples, allow_none=True)
    check_positive_int("train_classes", train_classes)
    root = Path(masks)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Expected ImageNet-S's mask folder (<wnid>/<name>.png), but {str(root)!r} is not one."
        )
    wnids = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in MERGED_WNIDS)
    if not wnids:
        raise ValueError(f"Expected wnid folders of masks in {str(root)!r}, but found none.")
    if class_seed is not None:
        random.Random(class_seed).shuffle(wnids)
    chosen = wnids[:train_classes] if partition == "train" else wnids[train_classes:]
    n = num_samples or (3 if partition == "train" else 1)
    pairs = [
        (wnid, p.stem) for wnid in chosen for p in sorted(root.joinpath(wnid).glob("*.png"))[:n]
    ]
    if not pairs:
        raise ValueError(
            f"Expected masks in the {partition!r} partition, but it is empty: {len(wnids)} classes "
            f"found in {str(root)!r}, train_classes={train_classes}."
        )
    return pairs


def _image_for(images: Path, wnid: str, stem: str) -> Path:
    for ext in (".JPEG", ".jpeg", ".jpg", ".JPG", ".png"):
        path = images / wnid / f"{stem}{ext}"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Expected the ImageNet image of mask {wnid}/{stem}.png at "
        f"{str(images / wnid / (stem + '.JPEG'))!r}, but it does not exist; give --images the "
        "ImageNet train folder (<wnid>/<name>.JPEG)."
    )


def _class_ids(mask: Path) -> list[int]:
    """The class ids of an ImageNet-S mask other than background (0) and ignore (1000)."""
    try:
        with Image.open(mask) as im:
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Could not read the ImageNet-S mask {str(mask)!r}: {err}") from err
    ids = np.unique(rgb[..., 0] + 256 * rgb[..., 1])
    return [int(i) for i in ids if i not in (0, 1000)]


def imagenet_s_files(
    masks: str | os.PathLike,
    images: str | os.PathLike,
    partition: str = "train",
    num_samples: int | None = None,
    train_classes: int = 500,
    class_seed: int | None = None,
) -> list[tuple[Path, Path, str, list[int]]]:
    """``(mask file, image file, wnid, class ids)`` of :func:`imagenet_s_selection`: every image
    found and every mask decoded, so that nothing fails once writing has started.

    Raises:
        FileNotFoundError: an image missing for a selected mask (named).
        ValueError: a mask that cannot be decoded (named).
    """
    pairs = imagenet_s_selection(masks, partition, num_samples, train_classes, class_seed)
    root = Path(masks)
    return [
        (
            root / w / f"{s}.png",
            _image_for(Path(images), w, s),
            w,
            _class_ids(root / w / f"{s}.png"),
        )
        for w, s in pairs
    ]


def write_imagenet_s_subset(
    masks: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    partition: str = "train",
    num_samples: int | None = None,
    train_classes: int = 500,
    class_seed: int | None = None,
    copy: bool = False,
    files: list[tuple[Path, Path, str, list[int]]] | None = None,
) -> dict:
    """Write the subset as ``out/images/<wnid>/`` and ``out/masks/<wnid>/`` for
    :class:`relreg.data.MaskedImageFolder` (``mask_format: imagenet_s``, ``classes: imagenet``).

    Files are symbolic links to the originals (``copy=True``: copies). Everything is checked
    before anything is written, the tree is written next to ``out`` and renamed to it at the end
    (an error leaves nothing behind); ``out`` must not exist yet. Also writes
    ``out/selection.json`` (the arguments, the pairs, and the masks with no or several class ids).

    ``files``: the result of :func:`imagenet_s_files` for the same arguments, when the caller
    already checked them (every mask is then decoded once); None computes it.

    Returns:
        The content of ``selection.json``.

    Raises:
        FileExistsError: when ``out`` exists.
        FileNotFoundError: an image missing for a selected mask (named).
    """
    out = Path(out)
    images = Path(images)
    if out.exists():
        raise FileExistsError(f"Expected a new output folder, but {str(out)!r} exists.")
    if files is None:
        files = imagenet_s_files(masks, images, partition, num_samples, train_classes, class_seed)
    pairs = [(w, m.stem) for m, _, w, _ in files]
    several = [f"{w}/{m.stem}" for m, _, w, found in files if len(found) > 1]
    empty = [f"{w}/{m.stem}" for m, _, w, found in files if not found]
    report = {
        "masks": str(Path(masks).resolve()),
        "images": str(images.resolve()),
        "partition": partition,
        "num_samples": num_samples or (3 if partition == "train" else 1),
        "train_classes": train_classes,
        "class_seed": class_seed,
        "classes": len({w for w, _ in pairs}),
        "pairs": [f"{w}/{s}" for w, s in pairs],
        "masks_with_several_ids": several,
        "masks_without_foreground": empty,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is owner-only; give it a plain mkdir's mode
    try:
        for mask, image, wnid, _ in files:
            for src, dst in (
                (mask, tmp / "masks" / wnid / mask.name),
                (image, tmp / "images" / wnid / image.name),
            ):
                dst.parent.mkdir(parents=True, exist_ok=True)
                if copy:
                    shutil.copyfile(src, dst)
                else:
                    dst.symlink_to(src.resolve())
        (tmp / "selection.json").write_text(json.dumps(report, indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def prepare_imagenet_s(
    masks: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    num_samples: int | None = None,
    train_classes: int = 500,
    class_seed: int | None = None,
    copy: bool = False,
) -> dict[str, dict]:
    """``relreg prepare imagenet-s``: write ``out/train`` and ``out/val`` (see
    :func:`write_imagenet_s_subset`); both partitions are checked before either is written.

    Returns:
        ``{"train": selection, "val": selection}``.
    """
    check_positive_int("--per-class", num_samples, allow_none=True)
    out = Path(out)
    planned = {}
    for part in ("train", "val"):
        if (out / part).exists():
            raise FileExistsError(f"Expected a new output folder, but {out / part} exists.")
        planned[part] = imagenet_s_files(
            masks, images, part, num_samples, train_classes, class_seed
        )
    return {
        part: write_imagenet_s_subset(
            masks, images, out / part, part, num_samples, train_classes, class_seed, copy, files
        )
        for part, files in planned.items()
    }
