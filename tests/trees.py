"""Tiny on-disk datasets in the native layouts relreg reads: ImageNet-S, wnid / index folders,
ObjectNet 1.0 (with its ``mappings/``), SI-Score. Shared by the data tests and the paper dry run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from relreg.data import class_names


def folder_tree(root: Path, folders: Sequence[str], size: int = 8, per_class: int = 1) -> Path:
    """``root/<folder>/<i>.png`` flat-coloured images."""
    for k, name in enumerate(folders):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = ((30 + 40 * k) % 256, (60 + 17 * i) % 256, 90)
            Image.new("RGB", (size, size), colour).save(root / name / f"{i}.png")
    return root


def imagenet_s_tree(
    root: Path,
    wnids: Sequence[str],
    files_per_class: int = 4,
    several_ids: bool = False,
    size: int = 8,
) -> tuple[Path, Path]:
    """An ImageNet-S mask split ``root/seg/<wnid>/<stem>.png`` (class id = R + 256 * G, 1000 =
    ignore) and the matching ImageNet images ``root/train/<wnid>/<stem>.JPEG``. Files are created
    in reverse order, so a directory listing need not be sorted."""
    masks = root / "seg"
    images = root / "train"
    lo = size // 4
    hi = size - size // 4
    for k, wnid in enumerate(wnids):
        (masks / wnid).mkdir(parents=True)
        (images / wnid).mkdir(parents=True)
        for j in reversed(range(files_per_class)):
            stem = f"{wnid}_{j}"
            ids = np.zeros((size, size), dtype=np.int64)
            ids[lo:hi, lo:hi] = 300 + k  # a class id above 255 exercises the G channel
            ids[0, :] = 1000  # "ignore"
            if several_ids and j == 0:
                ids[-1, -1] = 5
            rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
            Image.fromarray(rgb).save(masks / wnid / f"{stem}.png")
            Image.new("RGB", (size, size), ((k * 20) % 256, 0, 0)).save(
                images / wnid / f"{stem}.JPEG"
            )
    return masks, images


def objectnet_tree(root: Path, size: int = 10) -> Path:
    """A tiny ``objectnet-1.0`` in the shipped layout: ``images/<folder>/`` (a 1-pixel red border
    around each photo) and ``mappings/`` (its four files); returns the images folder. The alarm
    clock stands for two ImageNet classes; the air freshener for none."""
    images = root / "objectnet-1.0" / "images"
    for folder in ("air_freshener", "alarm_clock", "banana"):
        (images / folder).mkdir(parents=True)
        im = Image.new("RGB", (size, size), (255, 0, 0))
        im.paste(Image.new("RGB", (size - 2, size - 2), (0, 0, 255)), (1, 1))
        im.save(images / folder / "1.png")
    names = class_names(1000)
    lines = list(reversed(names))  # the label file in another order than the model's outputs
    mappings = root / "objectnet-1.0" / "mappings"
    mappings.mkdir()
    files = {
        "folder_to_objectnet_label.json": {
            "air_freshener": "Air freshener", "alarm_clock": "Alarm clock", "banana": "Banana"
        },
        "objectnet_to_imagenet_1k.json": {
            "Alarm clock": f"{names[409]}; {names[530]}", "Banana": names[954]
        },
        "pytorch_to_imagenet_2012_id.json": {str(i): 999 - i for i in range(1000)},
    }  # fmt: skip
    for name, content in files.items():
        (mappings / name).write_text(json.dumps(content))
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    return images


# Waterbirds' groups: (y, place) per group index 2 * y + place
WATERBIRDS_GROUPS = [(0, 0), (0, 1), (1, 0), (1, 1)]


def waterbirds_tree(
    root: Path,
    per_group: Sequence[Sequence[int]] = ((3, 2, 1, 2), (2, 2, 2, 2), (2, 2, 2, 2)),
    size: tuple[int, int] = (20, 24),
) -> tuple[Path, Path]:
    """A tiny Waterbirds: ``root/waterbird_complete95_forest2water2/`` (images in CUB's species
    folders and ``metadata.csv``) and ``root/CUB_200_2011/segmentations/`` (soft masks: 255 on the
    bird's core, 100 on a rim that a 0.5 threshold drops). ``per_group[split][group]`` images.
    The bird is a bright square, the place a dark (land) or blue (water) background."""
    data = root / "waterbird_complete95_forest2water2"
    segs = root / "CUB_200_2011" / "segmentations"
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    h, w = size
    k = 0
    for split, counts in enumerate(per_group):
        for group, count in enumerate(counts):
            y, place = WATERBIRDS_GROUPS[group]
            species = "001.Black_footed_Albatross" if y else "100.Brown_Pelican_like_landbird"
            for _ in range(count):
                k += 1
                name = f"{species}/Bird_{k:04d}.jpg"
                pixels = np.zeros((h, w, 3), dtype=np.uint8)
                pixels[..., 2 if place else 1] = 120
                soft = np.zeros((h, w), dtype=np.uint8)
                top, left = 2 + k % 5, 3 + k % 7
                soft[top - 1 : top + 9, left - 1 : left + 9] = 100
                soft[top : top + 8, left : left + 8] = 255
                pixels[soft == 255] = (240, 200, 40)
                (data / species).mkdir(parents=True, exist_ok=True)
                (segs / species).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(data / name, quality=95)
                Image.fromarray(soft).save(segs / name.replace(".jpg", ".png"))
                rows.append(f"{k},{name},{y},{split},{place},/x/place_{k}.jpg")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    return data, segs


def imagenet9_tree(root: Path, per_class: int = 2, size: int = 12, seed: int = 0) -> Path:
    """A tiny ImageNet-9 challenge: every variation's ``val/<class>/`` (the class names with their
    spaces), ``fg_mask/val/<class>/<stem>.npy`` (a square object) and an ``in_to_in9.json`` that
    maps ImageNet index ``i`` to ``i % 10`` (9 meaning -1, unmapped)."""
    from relreg.data.imagenet9 import IN9_CLASSES, IN9_MAPPING, VARIATIONS

    rng = np.random.default_rng(seed)
    for variation in VARIATIONS:
        for name in IN9_CLASSES:
            (root / variation / "val" / name).mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(IN9_CLASSES):
        (root / "fg_mask" / "val" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            stem = f"n0{k}_{i}"
            fg = np.zeros((size, size), dtype=bool)
            top = int(rng.integers(0, size // 2))
            fg[top : top + size // 2, 2 : 2 + size // 2] = True
            np.save(root / "fg_mask" / "val" / name / f"{stem}.npy", fg)
            for variation in VARIATIONS:
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / variation / "val" / name / f"{stem}.JPEG")
    table = {str(i): (i % 10 if i % 10 < 9 else -1) for i in range(1000)}
    (root / IN9_MAPPING).write_text(json.dumps(table))
    return root
