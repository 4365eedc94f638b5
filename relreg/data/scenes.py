"""``SpuriousScenes``: real handwritten digits on real photographs, with a spurious background cue.

The real-texture counterpart of :class:`relreg.data.SpuriousShapes`, in the setting of Waterbirds
(Sagawa, Koh, Hashimoto & Liang, "Distributionally Robust Neural Networks", ICLR 2020) and
ImageNet-9's backgrounds (Xiao, Engstrom, Ilyas & Madry, "Noise or Signal: The Role of Image
Backgrounds in Object Recognition", ICLR 2021): the class is the digit, and the photograph behind
it names the class too, most of the time. RobustViT (Chefer, Schwartz & Wolf, "Optimizing
Relevance Maps of Vision Transformers Improves Robustness", NeurIPS 2022) fine-tunes such a model
so that its relevance sits on the foreground (the digit's exact stroke mask).

Foreground: a digit of ``sklearn.datasets.load_digits`` (8 x 8 pixels), upsampled bilinearly to a
square of ``digit_size * size`` pixels (times a random 0.85 to 1.15), placed at a random position
inside the image; its stroke mask is the upsampled intensity above :data:`STROKE_THRESHOLD`. The
stroke is painted in one bright colour per image (every channel in [0.75, 1]) over a background
dimmed to [0, 0.6], so the digit stays visible on any photograph and the mask is exactly the set of
pixels the digit changed. Training splits (``unbiased``, ``train``) draw digits from the ``train``
pool, evaluation splits (``val``, ``test``, ``ood``) from the ``test`` pool; the pools share no
handwritten sample (:mod:`relreg.data.scene_sources`).

Background: a random crop (40 to 80% of the source's shorter side, any position, flipped half the
time, mild brightness / contrast / per-channel colour jitter) of one scikit-image photograph or
texture (:data:`relreg.data.scene_sources.BACKGROUNDS`; grey ones made RGB). Class ``k``'s source is
``BACKGROUNDS[k]``. As in SpuriousShapes, the background is the label's source with probability
``spurious`` in ``train`` / ``val`` / ``test``, drawn uniformly at random in ``unbiased`` (from the
class sources and ``distractors`` extra ones) and always another, uniformly chosen class's source
in ``ood``. Deterministic from ``seed``; the data need scikit-image and scikit-learn
(``pip install 'relreg[scenes]'``), imported only when a split is made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from relreg.data import scene_sources
from relreg.data.folders import MaskedImageFolder
from relreg.data.spurious import (
    SPLITS,
    GeneratedSplit,
    _per_channel,
    _split_params,
    write_split_folder,
)
from relreg.validate import check_choice, check_positive_int

__all__ = [
    "DIGITS",
    "STROKE_THRESHOLD",
    "ScenesBatch",
    "SpuriousScenes",
    "make_scenes",
    "write_scenes_folder",
]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STROKE_THRESHOLD = 0.4  # of the upsampled intensity in [0, 1] (load_digits' 0..16 divided by 16)
_DIGIT_POOL = {"unbiased": "train", "train": "train", "val": "test", "test": "test", "ood": "test"}


@dataclass
class ScenesBatch:
    """Generated scenes.

    Attributes:
        images: ``(N, 3, H, W)`` floats in [0, 1].
        masks: ``(N, H, W)`` floats in {0, 1}, 1 on the digit's stroke.
        labels: ``(N,)`` long, the digit.
        cues: ``(N,)`` long, the background's source, an index into ``BACKGROUNDS``: the class
            it names (equal to ``labels`` where the cue agrees), or ``>= num_classes`` for a
            distractor.
        digits: ``(N,)`` long, the drawn sample's index in ``sklearn.datasets.load_digits()``.
        boxes: ``(N, 3)`` long, where the digit was pasted: ``top``, ``left`` and ``side`` (the
            upsampled digit's height and width) in pixels.
    """

    images: Tensor
    masks: Tensor
    labels: Tensor
    cues: Tensor
    digits: Tensor
    boxes: Tensor


def _check_number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"Expected {name} a number in [{low}, {high}], but got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"Expected {name} in [{low}, {high}], but got {value!r}.")
    return float(value)


def _check_args(n: int, size: int, num_classes: int, distractors: int) -> None:
    check_positive_int("n", n)
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"Expected size an int >= 16, but got {size!r}.")
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or not 2 <= num_classes <= 10
    ):
        raise ValueError(f"Expected num_classes an int in [2, 10], but got {num_classes!r}.")
    most = len(scene_sources.BACKGROUNDS) - num_classes
    if isinstance(distractors, bool) or not isinstance(distractors, int):
        raise TypeError(f"Expected distractors an int in [0, {most}], but got {distractors!r}.")
    if not 0 <= distractors <= most:
        raise ValueError(
            f"Expected distractors in [0, {most}] (the backgrounds left by {num_classes} classes), "
            f"but got {distractors!r}."
        )


def _backgrounds(cues: Tensor, size: int, g: torch.Generator) -> Tensor:
    """``(N, 3, size, size)`` in [0, 1]: a jittered random crop of each cue's source."""
    n = len(cues)
    frac = 0.4 + 0.4 * torch.rand(n, generator=g)  # the crop's side / the source's shorter side
    cx, cy = torch.rand(2, n, generator=g)  # the crop's centre, 0 to 1 of the room left
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    contrast, brightness = 0.8 + 0.4 * torch.rand(2, n, 1, 1, 1, generator=g)
    gains = 0.9 + 0.2 * torch.rand(n, 3, 1, 1, generator=g)
    out = torch.empty(n, 3, size, size)
    for source in cues.unique().tolist():
        idx = (cues == source).nonzero().flatten()
        image = scene_sources.background(scene_sources.BACKGROUNDS[source], 2 * size)
        h, w = image.shape[-2:]
        side = frac[idx] * min(h, w)  # the crop's side in source pixels
        ax = side / w
        ay = side / h
        theta = torch.zeros(len(idx), 2, 3)
        theta[:, 0, 0] = ax * flip[idx]
        theta[:, 1, 1] = ay
        theta[:, 0, 2] = (2 * cx[idx] - 1) * (1 - ax)
        theta[:, 1, 2] = (2 * cy[idx] - 1) * (1 - ay)
        grid = F.affine_grid(theta, [len(idx), 3, size, size], align_corners=False)
        crops = F.grid_sample(
            image.expand(len(idx), -1, -1, -1), grid, padding_mode="border", align_corners=False
        )
        out[idx] = crops
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean).mul(brightness * gains).clamp(0, 1)


def make_scenes(
    n: int,
    size: int = 32,
    num_classes: int = 4,
    seed: int = 0,
    spurious: float = 0.0,
    digit_size: float = 0.65,
    digits: str = "train",
    distractors: int = 0,
) -> ScenesBatch:
    """Generate ``n`` scenes with their stroke masks, labels and background sources.

    Args:
        n: number of images.
        size: image height and width in pixels (>= 16).
        num_classes: the digits 0 to ``num_classes - 1`` (2 to 10).
        seed: random seed; the output is a pure function of the arguments.
        spurious: probability that the background is the label's source; otherwise it is one of
            the other ``num_classes - 1 + distractors`` sources, uniformly.
        digit_size: the digit's side as a fraction of ``size`` (0.3 to 0.9), before a random
            scale of 0.85 to 1.15 (clipped to [8, size] pixels).
        digits: the sklearn digit pool, ``"train"`` or ``"test"``.
        distractors: extra background sources that name no class (``BACKGROUNDS[num_classes:]``).

    Returns:
        A :class:`ScenesBatch`; labels cycle through the classes (balanced).

    Example:
        >>> batch = make_scenes(8, size=32, num_classes=4)
        >>> batch.images.shape, batch.masks.shape, batch.labels.tolist()[:4]
        (torch.Size([8, 3, 32, 32]), torch.Size([8, 32, 32]), [0, 1, 2, 3])
    """
    _check_args(n, size, num_classes, distractors)
    spurious = _check_number("spurious", spurious, 0.0, 1.0)
    digit_size = _check_number("digit_size", digit_size, 0.3, 0.9)
    pool, targets, indices = scene_sources.digits(digits)  # validates ``digits``
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    pick = torch.rand(n, generator=g)
    chosen = torch.empty(n, dtype=torch.long)  # position in the pool
    for c in range(num_classes):
        members = (targets == c).nonzero().flatten()
        where = labels == c
        chosen[where] = members[(pick[where] * len(members)).long().clamp(max=len(members) - 1)]
    scale = 0.85 + 0.3 * torch.rand(n, generator=g)
    sides = (digit_size * size * scale).round().long().clamp(8, size)
    top = (torch.rand(n, generator=g) * (size - sides + 1)).long()
    left = (torch.rand(n, generator=g) * (size - sides + 1)).long()
    colour = 0.75 + 0.25 * torch.rand(n, 3, 1, 1, generator=g)
    sources = num_classes + distractors
    other = (labels + torch.randint(1, sources, (n,), generator=g)) % sources
    cues = torch.where(torch.rand(n, generator=g) < spurious, labels, other)
    background = 0.6 * _backgrounds(cues, size, g)
    masks = torch.zeros(n, size, size)
    for side in sides.unique().tolist():
        idx = (sides == side).nonzero().flatten()
        up = F.interpolate(pool[chosen[idx], None], size=(side, side), mode="bilinear")[:, 0]
        for i, stroke in zip(idx.tolist(), (up > STROKE_THRESHOLD).float(), strict=True):
            masks[i, top[i] : top[i] + side, left[i] : left[i] + side] = stroke
    m = masks.unsqueeze(1)
    images = m * colour + (1 - m) * background
    boxes = torch.stack([top, left, sides], dim=1)
    return ScenesBatch(images, masks, labels, cues, indices[chosen], boxes)


class SpuriousScenes(GeneratedSplit):
    """Real digits on real photographs with a spurious background cue, yielding
    :class:`relreg.data.Sample` dicts; a drop-in for :class:`relreg.data.SpuriousShapes`.

    Args:
        split: ``unbiased``, ``train``, ``val``, ``test`` or ``ood`` (as SpuriousShapes).
        n: number of images.
        size: image size in pixels (>= 16).
        num_classes: number of digit classes (2 to 10): the digits 0 to ``num_classes - 1``.
        spurious: cue agreement in ``train`` / ``val`` / ``test``.
        seed: base seed; every split has its own stream.
        masked_fraction: fraction of samples that carry their mask (``has_mask``).
        mean, std: normalisation, one value or one per RGB channel (RobustViT: 0.5, 0.5).
        cache_dir: if set, the split is written there once as a real image folder
            (:func:`write_scenes_folder`) and read back through
            :class:`relreg.data.MaskedImageFolder`.
        digit_size: the digit's side as a fraction of ``size`` (0.3 to 0.9; default 0.65).
        digits: the digit pool, ``"train"``, ``"test"`` or ``"auto"`` (``train`` for the
            ``unbiased`` and ``train`` splits, ``test`` for ``val``, ``test`` and ``ood``).
        distractors: for ``split="unbiased"`` only, extra background sources that name no class;
            the background is then uniform over ``num_classes + distractors`` sources.

    Attributes:
        labels, cues, digits, boxes: ``(N,)``, ``(N,)``, ``(N,)`` and ``(N, 3)`` long, in item
            order, as in :class:`ScenesBatch` (``cues``: the background's source index;
            ``backgrounds[cues[i]]`` names it).
        classes: the digit names; backgrounds: the source names, class sources first.

    Example:
        >>> ds = SpuriousScenes("train", n=8)
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
        digit_size: float = 0.65,
        digits: str = "auto",
        distractors: int = 0,
    ) -> None:
        _check_number("masked_fraction", masked_fraction, 0.0, 1.0)
        mean = _per_channel("mean", mean)
        std = _per_channel("std", std)
        check_choice("split", split, SPLITS)
        check_choice("digits", digits, ("auto", *scene_sources.DIGIT_POOLS))
        _check_args(n, size, num_classes, distractors)
        if distractors and split != "unbiased":
            raise ValueError(
                f"Expected distractors=0 for split {split!r} (they only enter 'unbiased'), "
                f"but got {distractors!r}."
            )
        _check_number("spurious", spurious, 0.0, 1.0)
        _check_number("digit_size", digit_size, 0.3, 0.9)
        _, split_seed = _split_params(split, spurious, num_classes, seed)
        pool = _DIGIT_POOL[split] if digits == "auto" else digits
        self.split = split
        self.classes = list(DIGITS[:num_classes])
        self.backgrounds = list(scene_sources.BACKGROUNDS[: num_classes + distractors])
        g = torch.Generator().manual_seed(split_seed)
        self.has_mask = torch.rand(n, generator=g) < masked_fraction
        args = (split, n, size, num_classes, spurious, seed, digit_size, pool, distractors)
        self.folder: MaskedImageFolder | None = None
        if cache_dir is not None:
            name = f"scenes-{split}-n{n}-s{size}-c{num_classes}-p{spurious}-seed{seed}"
            name += f"-d{digit_size}-{pool}" + (f"-x{distractors}" if distractors else "")
            root = write_scenes_folder(Path(cache_dir) / name, *args)
            self._read_folder(root, mean, std)
            items = json.loads((root / "items.json").read_text())
            order = [int(path.stem) for path, _, _ in self.folder.samples]
            self.cues, self.digits, self.boxes = (
                torch.tensor(items[k])[order] for k in ("cues", "digits", "boxes")
            )
            self.num_cues = len(self.backgrounds)
            return
        batch = _generate(*args)
        shift = torch.tensor(mean).view(3, 1, 1)
        scale = torch.tensor(std).view(3, 1, 1)
        self.images = (batch.images - shift) / scale
        self.masks = batch.masks
        self.labels = batch.labels
        self.cues = batch.cues
        self.num_cues = len(self.backgrounds)
        self.digits = batch.digits
        self.boxes = batch.boxes


def _generate(
    split: str,
    n: int,
    size: int,
    num_classes: int,
    spurious: float,
    seed: int,
    digit_size: float,
    digits: str,
    distractors: int,
) -> ScenesBatch:
    p, split_seed = _split_params(split, spurious, num_classes, seed)
    p = 1.0 / (num_classes + distractors) if split == "unbiased" else p
    return make_scenes(n, size, num_classes, split_seed, p, digit_size, digits, distractors)


def write_scenes_folder(
    root: str | os.PathLike,
    split: str = "train",
    n: int = 64,
    size: int = 32,
    num_classes: int = 4,
    spurious: float = 0.95,
    seed: int = 0,
    digit_size: float = 0.65,
    digits: str = "train",
    distractors: int = 0,
) -> Path:
    """Write a split as an image folder (``images/<digit>/*.png``, ``masks/<digit>/*.png``).

    Also writes ``items.json`` (``cues``, ``digits``, ``boxes`` per image, in file-name order) and
    ``meta.json``. Built in a temporary directory and renamed into place; an existing folder made
    with the same arguments is reused (a cache), one made with other arguments is an error.

    Returns:
        ``root``, ready for :class:`relreg.data.MaskedImageFolder`.
    """
    meta = {
        "benchmark": "scenes",
        **dict(split=split, n=n, size=size, num_classes=num_classes, spurious=spurious),
        **dict(seed=seed, digit_size=digit_size, digits=digits, distractors=distractors),
    }

    def generate() -> tuple[Tensor, Tensor, Tensor, dict]:
        args = (split, n, size, num_classes, spurious, seed, digit_size, digits, distractors)
        batch = _generate(*args)
        items = {k: getattr(batch, k).tolist() for k in ("cues", "digits", "boxes")}
        return batch.images, batch.masks, batch.labels, items

    return write_split_folder(root, meta, generate, DIGITS, what="scenes")
