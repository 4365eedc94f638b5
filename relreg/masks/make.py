"""``relreg masks``: foreground masks for an image folder, in the layout the fit configs read.

:func:`make_masks` reads ``images/<class>/<image>``, chooses up to ``per_class`` images per class
(seeded, as :class:`relreg.data.MaskedImageFolder` chooses them), runs a mask method of
:data:`relreg.masks.MASK_METHODS` on them in batches and writes

- ``out/images/<class>/<image>``: links to the chosen images (``copy=True``: copies);
- ``out/masks/<class>/<stem>.png``: 0/255 grey masks at each image's size;
- ``out/masks_summary.json``: what was seen, written, skipped and how much of each image the
  masks cover (:func:`summarize`).

``out`` is then a :class:`~relreg.data.MaskedImageFolder` root (``data.init_args.train_root`` of
a fit config). Every file is written atomically (:func:`relreg.io.atomic_write`), and a mask that
exists is kept, so an interrupted run resumes where it stopped; ``overwrite=True`` makes them
again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from relreg.data.classes import prompt_name
from relreg.data.files import _choose, _class_folders, _class_images, _decodes, load_mask, load_rgb
from relreg.io import atomic_write, check_writable
from relreg.validate import check_positive_int

__all__ = ["SUMMARY_FILE", "make_masks", "summarize"]

SUMMARY_FILE = "masks_summary.json"
EMPTY_BELOW = 0.01  # a mask covering less than this share of its image counts as empty
WHOLE_ABOVE = 0.99  # and more than this share as the whole image
Segmenter = Callable[[Sequence[Tensor], Sequence[str]], list[Tensor]]


def summarize(shares: Sequence[float], bins: int = 10) -> dict:
    """Foreground shares of masks: counts of empty and whole-image masks, mean and histogram.

    Args:
        shares: each mask's foreground share in [0, 1].
        bins: histogram bins over [0, 1].

    Example:
        >>> summarize([0.0, 0.5, 1.0], bins=2)["histogram"]
        {'edges': [0.0, 0.5, 1.0], 'counts': [1, 2]}
    """
    values = np.asarray(shares, dtype=float)
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return {
        "masks": len(values),
        "empty": int((values < EMPTY_BELOW).sum()),
        "whole_image": int((values > WHOLE_ABOVE).sum()),
        "mean_foreground_share": float(values.mean()) if len(values) else None,
        "histogram": {"edges": [round(e, 4) for e in edges.tolist()], "counts": counts.tolist()},
    }


def _image_root(images: Path) -> Path:
    """``images`` itself, or its ``images/`` folder when it is already a masked-folder root."""
    return images / "images" if (images / "images").is_dir() else images


def _link(src: Path, dst: Path, copy: bool) -> None:
    if dst.exists() or dst.is_symlink():
        return
    if copy:
        atomic_write(dst, lambda tmp: Path(tmp).write_bytes(src.read_bytes()))
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(src.resolve())
    os.replace(tmp, dst)


def _write_mask(path: Path, mask: Tensor) -> None:
    pixels = (mask.cpu().numpy().astype(np.uint8)) * 255
    atomic_write(path, lambda tmp: Image.fromarray(pixels, mode="L").save(tmp, format="PNG"))


def make_masks(
    images: str | os.PathLike,
    out: str | os.PathLike,
    method: str | Segmenter = "tokencut",
    *,
    per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    prompt: str = "a photo of a {}",
    batch_size: int = 8,
    copy: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options: object,
) -> dict:
    """Make foreground masks for an image folder (see the module docstring).

    Args:
        images: ``<class>/<image>`` folders (or a masked-folder root with ``images/``).
        out: output root; it is created, but its parent folder must exist.
        method: a name of :data:`relreg.masks.MASK_METHODS` (``"tokencut"``, ``"clipseg"``,
            ``"sam3"``) or a callable ``(images, prompts) -> masks`` (lists of ``(3, H, W)`` uint8
            images, strings and ``(H, W)`` bool masks).
        per_class: masks for at most this many images per class (RobustViT trains on 3).
        limit: at most this many images in all (after ``per_class``; in class order).
        seed: seed of the per-class choice (the same choice as ``MaskedImageFolder``'s).
        prompt: template of the text prompt, ``{}`` the class name (timm's lemma for an ImageNet
            wnid folder, else the folder name with ``_`` as spaces); TokenCut ignores it.
        batch_size: images per call of the method.
        copy: copy the images into ``out/images`` instead of linking them.
        overwrite: make masks that exist again (default: keep them, which resumes a run).
        progress: show a progress bar.
        **options: passed to the method's factory (e.g. ``device``, ``threshold``, ``refine``).

    Returns:
        The summary written to ``out/masks_summary.json``: ``images_seen``, ``masks_written``,
        ``masks_kept`` (existing, resumed), ``unreadable`` (paths), the foreground statistics of
        :func:`summarize` over every mask of the run, ``seconds`` and ``seconds_per_mask``.

    Raises:
        FileNotFoundError: ``images`` or the parent of ``out`` does not exist.
        ValueError: bad arguments or an unwritable ``out``, before any work.
    """
    from relreg.masks.methods import MASK_METHODS

    check_positive_int("per_class", per_class, allow_none=True)
    check_positive_int("limit", limit, allow_none=True)
    check_positive_int("batch_size", batch_size)
    if not isinstance(prompt, str) or "{}" not in prompt:
        raise ValueError(f"Expected prompt to be a template with '{{}}', but got {prompt!r}.")
    if isinstance(method, str):
        factory = MASK_METHODS.get(method)
    elif callable(method):
        factory = None
    else:
        raise TypeError(f"Expected method to be a name or a callable, but got {method!r}.")
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(
            f"Expected the parent folder of out to exist, but {str(out.parent)!r} does not."
        )
    root = _image_root(Path(images))
    _class_images(root, _class_folders(root, "images"))  # a bad tree fails before out is made
    check_writable(out, "out")

    chosen, unreadable = _chosen_images(root, per_class, limit, seed)
    todo, shares, kept = [], [], 0
    for name, path in chosen:
        target = out / "masks" / name / f"{path.stem}.png"
        _link(path, out / "images" / name / path.name, copy)
        if target.exists() and not overwrite:
            shares.append(float(load_mask(target).float().mean()))
            kept += 1
        else:
            todo.append((name, path, target))

    start = time.perf_counter()
    written = 0
    if todo:
        segment = factory(**options) if factory is not None else method
        bar = tqdm(total=len(todo), desc="masks", unit="image", disable=not progress)
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            pixels = [load_rgb(path) for _, path, _ in batch]
            prompts = [prompt.format(prompt_name(name)) for name, _, _ in batch]
            masks = segment(pixels, prompts)
            for (_, _, target), image, mask in zip(batch, pixels, masks, strict=True):
                if tuple(mask.shape) != tuple(image.shape[1:]):
                    raise ValueError(
                        f"Expected the method's mask of {target.stem} at the image's size "
                        f"{tuple(image.shape[1:])}, but got {tuple(mask.shape)}."
                    )
                _write_mask(target, mask.bool())
                shares.append(float(mask.float().mean()))
                written += 1
            bar.update(len(batch))
        bar.close()
    seconds = time.perf_counter() - start
    summary = {
        "images": str(root.resolve()),
        "method": method if isinstance(method, str) else getattr(method, "__name__", "callable"),
        "options": {k: _describe(v) for k, v in options.items()},
        "per_class": per_class,
        "limit": limit,
        "seed": seed,
        "prompt": prompt,
        "classes": len({name for name, _ in chosen}),
        "images_seen": len(chosen) + len(unreadable),
        "masks_written": written,
        "masks_kept": kept,
        "unreadable": [str(p) for p in unreadable],
        **summarize(shares),
        "seconds": round(seconds, 3),
        "seconds_per_mask": round(seconds / written, 4) if written else None,
    }
    atomic_write(
        out / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2))
    )
    return summary


def _chosen_images(
    root: Path, per_class: int | None, limit: int | None, seed: int
) -> tuple[list[tuple[str, Path]], list[Path]]:
    """``(class, image)`` pairs chosen as ``MaskedImageFolder`` chooses them, and the unreadable
    images passed over."""
    folders = _class_folders(root, "images")
    files = _class_images(root, folders)
    chosen: list[tuple[str, Path]] = []
    unreadable: list[Path] = []
    for name in folders:
        entries = [(p,) for p in files[name]]
        picked, bad = _choose(entries, per_class, f"{seed}/{name}", lambda e: _badfile(e[0]))
        chosen += [(name, p) for (p,) in picked]
        unreadable += bad
    return (chosen if limit is None else chosen[:limit]), unreadable


def _describe(value: object) -> object:
    """An option as the summary records it: plain values as they are, objects by type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (Path, torch.device)):
        return str(value)
    return type(value).__name__


def _badfile(path: Path) -> Path | None:
    return None if _decodes(path) else path


def summary_lines(summary: dict) -> list[str]:
    """The summary as the command prints it."""
    hist = summary["histogram"]
    bars = "  ".join(
        f"{lo:.1f}-{hi:.1f}: {n}"
        for lo, hi, n in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"], strict=True)
    )
    mean = summary["mean_foreground_share"]
    lines = [
        f"{summary['images_seen']} images seen in {summary['classes']} classes: "
        f"{summary['masks_written']} masks written, {summary['masks_kept']} kept from an earlier "
        f"run, {len(summary['unreadable'])} unreadable images skipped",
        f"{summary['empty']} empty masks (< {EMPTY_BELOW:.0%} of the image), "
        f"{summary['whole_image']} whole-image masks (> {WHOLE_ABOVE:.0%}); mean foreground "
        f"share {'-' if mean is None else f'{mean:.3f}'}",
        f"foreground share histogram: {bars}",
    ]
    lines += [f"  unreadable: {p}" for p in summary["unreadable"][:10]]
    return lines
