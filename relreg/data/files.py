"""Reading class-folder image trees: listing, seeded per-class choice, decoding images and masks.

Shared by :class:`relreg.data.MaskedImageFolder`, :class:`relreg.data.OODImageFolder` and
``relreg prepare``. Listings are sorted, so nothing depends on the file system's order.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["IMAGE_EXTENSIONS", "MASK_FORMATS", "detect_mask_format", "load_mask", "load_rgb"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")
MASK_FORMATS = ("binary", "imagenet_s")
# What PIL raises for a file it cannot decode: unknown format, truncated data, broken chunks.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_SKIP_HINT = "pass skip_corrupt=True to the image folder to drop unreadable files"


def _class_folders(root: Path, what: str) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"Expected {what} folder {str(root)!r}, but it does not exist.")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not folders:
        loose = len(_images_in(root))
        hint = f"; its {loose} image files belong in class folders <class>/<image>" if loose else ""
        raise ValueError(f"Expected class folders in {str(root)!r}, but found none{hint}.")
    return folders


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_EXTENSIONS)


def _class_images(root: Path, folders: Sequence[str]) -> dict[str, list[Path]]:
    """The sorted image files of each class folder; raises if any folder holds none."""
    files = {name: _images_in(root / name) for name in folders}
    empty = [name for name in folders if not files[name]]
    if not empty:
        return files
    others = sorted(p.name for name in empty for p in (root / name).iterdir() if p.is_file())
    seen = f" (other files: {others[:3]})" if others else ""
    expected = f"image files ({', '.join(IMAGE_EXTENSIONS)})"
    if len(empty) == len(folders):
        raise ValueError(
            f"Expected {expected} in the class folders of {str(root)!r}, but all "
            f"{len(folders)} are empty{seen}."
        )
    raise ValueError(
        f"Expected {expected} in every class folder of {str(root)!r}, but {len(empty)} of "
        f"{len(folders)} are empty: {empty[:5]}{seen}."
    )


def _decodes(path: Path) -> bool:
    """Whether PIL opens and fully decodes ``path``."""
    try:
        with Image.open(path) as im:
            im.load()
    except _DECODE_ERRORS:
        return False
    return True


def _unreadable(entry: tuple) -> Path | None:
    """The first file of a sample ``(image, mask or None, ..., label)`` that does not decode."""
    return next((p for p in entry[:-1] if p is not None and not _decodes(p)), None)


Entry = TypeVar("Entry", bound=tuple)


def _choose(
    entries: Sequence[Entry],
    per_class: int | None = None,
    seed: str = "",
    check: Callable[[Entry], Path | None] | None = None,
) -> tuple[list[Entry], list[Path]]:
    """Up to ``per_class`` entries drawn with ``seed``, sorted, and the files rejected.

    ``per_class=None`` keeps every entry. ``check`` returns the unreadable file of an entry or
    None. A rejected entry is replaced by a further draw from the rest, so a class keeps
    ``per_class`` readable images when it has them; when every file is readable the choice equals
    the unchecked one.
    """
    rng = random.Random(seed)
    pool = list(entries)
    chosen = []
    rejected = []
    while pool and (per_class is None or len(chosen) < per_class):
        want = len(pool) if per_class is None else per_class - len(chosen)
        if want >= len(pool):
            draw = pool
            pool = []
        else:
            draw = rng.sample(pool, want)
            taken = set(draw)
            pool = [e for e in pool if e not in taken]
        for entry in draw:
            bad = check(entry) if check is not None else None
            if bad is None:
                chosen.append(entry)
            else:
                rejected.append(bad)
    return sorted(chosen), rejected


def _warn_skipped(root: Path, skipped: Sequence[Path]) -> None:
    if skipped:
        names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in skipped]
        more = ", ..." if len(names) > 5 else ""
        warnings.warn(
            f"Skipped {len(skipped)} unreadable files under {str(root)!r} (skip_corrupt=True): "
            f"{', '.join(names[:5])}{more}.",
            stacklevel=3,
        )


def load_rgb(path: Path) -> Tensor:
    """Read an image file as a ``(3, H, W)`` uint8 tensor (grey and RGBA are converted to RGB)."""
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    except _DECODE_ERRORS as err:
        raise ValueError(
            f"Could not read {str(path)!r} as an image ({err}); {_SKIP_HINT}."
        ) from err


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
    except _DECODE_ERRORS as err:
        raise ValueError(f"Could not read mask {str(path)!r} ({err}); {_SKIP_HINT}.") from err
    if fmt == "imagenet_s":
        ids = arr[..., 0] + 256 * arr[..., 1]
        return torch.from_numpy(((ids != 0) & (ids != 1000)).astype(np.uint8))
    values = set(np.unique(arr).tolist())
    if not (values <= {0, 1} or values <= {0, 255}):
        raise ValueError(
            f"Expected mask values in {{0, 1}} or {{0, 255}} in {str(path)!r}, "
            f"but got {sorted(values)[:6]}."
        )
    return torch.from_numpy((arr > 0).astype(np.uint8))


def detect_mask_format(mask_root: Path) -> str:
    """``"imagenet_s"`` when the first mask under ``mask_root/<class>/`` is an RGB image (ImageNet-S
    encodes the class as ``R + 256 * G``), else ``"binary"`` (grey masks; also when none exist)."""
    first = next(iter(sorted(Path(mask_root).glob("*/*.png"))), None)
    if first is None:
        return "binary"
    with Image.open(first) as im:
        return "imagenet_s" if im.mode in ("RGB", "RGBA") else "binary"
