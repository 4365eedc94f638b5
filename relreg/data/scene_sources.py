"""The real images behind :class:`relreg.data.SpuriousScenes`: scikit-image photographs and
scikit-learn's handwritten digits, loaded lazily (the optional extra ``relreg[scenes]``).

Backgrounds (:data:`BACKGROUNDS`) are PNG images that scikit-image ships inside its wheel
(``skimage/data/``, checked with 0.26: no download, no pooch). The JPEG ones (``rocket``,
``hubble_deep_field``, ``retina``) are left out so that decoding cannot differ between machines,
and so is ``moon``, whose docstring states no licence. The licences, as the ``skimage.data``
docstrings state them (the package's LICENSE.txt says nothing about its data), are in
:data:`LICENCES`: CC0 or public domain for every image but ``coins`` (Brooklyn Museum) and
``immunohistochemistry``, which state "no known copyright restrictions".

Digits are ``sklearn.datasets.load_digits``: a copy of the test set of the UCI "Optical
Recognition of Handwritten Digits" data (E. Alpaydin and C. Kaynak, 1998; CC BY 4.0), 1,797 images
of 8 x 8 pixels with 17 grey levels (0 to 16), shipped in scikit-learn's wheel. The samples come in
blocks of about 130, one per writer (the form's fixed digit order restarts at each block);
:data:`DIGIT_SPLIT` (1287) is such a block boundary, so the ``"train"`` pool (indices below it,
1,287 samples, 127 to 131 per class) and the ``"test"`` pool (510 samples, 47 to 52 per class)
share no sample and, as far as the order shows, no writer.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BACKGROUNDS", "DIGIT_POOLS", "DIGIT_SPLIT", "LICENCES", "background", "digits"]

# one background source per class, the most distinct first (colour, then texture); with 10
# classes the last one is left as a distractor (``SpuriousScenes(distractors=...)``)
BACKGROUNDS = (
    "coffee",
    "grass",
    "immunohistochemistry",
    "brick",
    "chelsea",
    "gravel",
    "astronaut",
    "cell",
    "coins",
    "camera",
    "clock",
)
LICENCES = {
    "coffee": "CC0 (photographer Rachel Michetti)",
    "grass": "CC0 (DeviantArt texture)",
    "immunohistochemistry": "no known copyright restrictions",
    "brick": "CC0 (CC0Textures Bricks25)",
    "chelsea": "CC0 (photographer Stefan van der Walt)",
    "gravel": "CC0 (CC0Textures Gravel04)",
    "astronaut": "public domain (NASA)",
    "cell": "CC0 (public domain dedication)",
    "coins": "no known copyright restrictions (Brooklyn Museum)",
    "camera": "CC0 (photographer Lav Varshney)",
    "clock": "public domain (photographer Stefan van der Walt)",
}
DIGIT_SPLIT = 1287
DIGIT_POOLS = ("train", "test")
_EXTRA = "pip install 'relreg[scenes]'"


def _import(module: str) -> ModuleType:
    """Import ``module`` (scikit-image or scikit-learn).

    Raises:
        ImportError: when it is absent, naming the ``relreg[scenes]`` extra and how to install it.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"relreg.data.SpuriousScenes needs scikit-image and scikit-learn (the optional extra "
            f"relreg[scenes]: {_EXTRA}), but {module} could not be imported: {err}"
        ) from err


@cache
def _source(name: str) -> Tensor:
    """``(3, H, W)`` float in [0, 1]: a background source at full resolution, grey made RGB."""
    data = _import("skimage.data")
    image = torch.from_numpy(getattr(data, name)().copy()).float() / 255.0
    image = image.unsqueeze(0).expand(3, -1, -1) if image.ndim == 2 else image.permute(2, 0, 1)
    return image[:3].contiguous()


@cache
def background(name: str, side: int) -> Tensor:
    """A background source resized (antialiased) so that its shorter side has ``side`` pixels.

    Args:
        name: one of :data:`BACKGROUNDS`.
        side: the shorter side in pixels after resizing.

    Returns:
        ``(3, H, W)`` float in [0, 1], ``min(H, W) == side``; cached per ``(name, side)``.
    """
    if name not in BACKGROUNDS:
        raise ValueError(f"Expected a background in {BACKGROUNDS}, but got {name!r}.")
    image = _source(name)
    h, w = image.shape[-2:]
    size = (side, round(w * side / h)) if h <= w else (round(h * side / w), side)
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0].clamp(0, 1)


@cache
def _all_digits() -> tuple[Tensor, Tensor]:
    bunch = _import("sklearn.datasets").load_digits()
    return torch.from_numpy(bunch.images).float() / 16.0, torch.from_numpy(bunch.target).long()


def digits(pool: str) -> tuple[Tensor, Tensor, Tensor]:
    """One pool of the sklearn digits.

    Args:
        pool: ``"train"`` (indices below :data:`DIGIT_SPLIT`) or ``"test"`` (the rest).

    Returns:
        ``images (M, 8, 8)`` float in [0, 1], ``targets (M,)`` long (the digit) and
        ``indices (M,)`` long, each sample's index in ``load_digits()``.
    """
    if pool not in DIGIT_POOLS:
        raise ValueError(f"Expected digits one of {DIGIT_POOLS}, but got {pool!r}.")
    images, targets = _all_digits()
    keep = slice(0, DIGIT_SPLIT) if pool == "train" else slice(DIGIT_SPLIT, None)
    return images[keep], targets[keep], torch.arange(len(targets))[keep]
