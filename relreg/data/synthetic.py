"""Generated images with foreground masks: the built-in CPU benchmark.

Each image shows one bright shape (the class: circle, square, triangle, cross, ...) of a random
colour, position and size on a dim, smooth random background. With ``spurious > 0`` the background
tint is the class's own tint with probability ``spurious`` and another class's tint otherwise: a
shortcut a model can learn instead of the shape. ``spurious = 1 / num_classes`` makes the tint
uninformative (unbiased data); ``spurious = 0`` makes it always point to a wrong class (an
out-of-distribution split for the same classes).

``cue="marker"`` makes the cue local instead, as in decoy MNIST (Ross, Hughes & Doshi-Velez, IJCAI
2017): a white square of ``size // 8`` pixels in one of the four corners (corner ``k`` for class
``k``, classes beyond four share corners modulo four), aligned to a grid of ``size // 8``; the shape
stays inside the central region, at least one marker width away from it, and the background tint
is uninformative.
Everything is a function of ``seed``: the same call gives the same data on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from relreg.validate import check_positive_int

__all__ = ["CUES", "SHAPES", "ShapesBatch", "make_shapes"]

CUES = ("tint", "marker")

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
_TINTS = torch.tensor(
    [
        [0.9, 0.3, 0.3],
        [0.3, 0.8, 0.3],
        [0.3, 0.4, 0.9],
        [0.9, 0.8, 0.2],
        [0.7, 0.3, 0.8],
        [0.2, 0.8, 0.8],
    ]
)


@dataclass
class ShapesBatch:
    """Generated data.

    Attributes:
        images: ``(N, 3, H, W)`` floats in [0, 1].
        masks: ``(N, H, W)`` floats in {0, 1}, 1 on the shape.
        labels: ``(N,)`` long, the shape's index in :data:`SHAPES`.
        cues: ``(N,)`` long, the class the cue points to (equal to ``labels`` where it agrees).
    """

    images: Tensor
    masks: Tensor
    labels: Tensor
    cues: Tensor


def _shape_mask(kind: str, dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    ax = dx.abs()
    ay = dy.abs()
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return (ax <= 0.8 * r) & (ay <= 0.8 * r)
    if kind == "triangle":
        return (dy <= 0.8 * r) & (dy >= -r) & (ax <= (dy + r) * 0.55)
    if kind == "cross":
        return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "diamond":
        return ax + ay <= r
    raise ValueError(f"Unknown shape {kind!r}; expected one of {SHAPES}.")


def make_shapes(
    n: int,
    size: int = 32,
    num_classes: int = 4,
    seed: int = 0,
    spurious: float = 0.0,
    cue: str = "tint",
) -> ShapesBatch:
    """Generate ``n`` images of shapes with their masks and labels.

    Args:
        n: number of images.
        size: image height and width in pixels.
        num_classes: number of shape classes, at most ``len(SHAPES)``.
        seed: random seed; the output is a pure function of the arguments.
        spurious: probability that the background tint is the class's own tint (a shortcut);
            otherwise it is the tint of another class, chosen uniformly.
        cue: ``"tint"`` (the background's colour) or ``"marker"`` (a corner square; then
            ``spurious`` is the probability that the marker sits in the class's corner).

    Returns:
        A :class:`ShapesBatch`; labels cycle through the classes (balanced).

    Example:
        >>> batch = make_shapes(8, size=32, num_classes=4)
        >>> batch.images.shape, batch.masks.shape, batch.labels.tolist()[:4]
        (torch.Size([8, 3, 32, 32]), torch.Size([8, 32, 32]), [0, 1, 2, 3])
    """
    check_positive_int("n", n)
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"Expected size an int >= 8, but got {size!r}.")
    if not isinstance(num_classes, int) or not 2 <= num_classes <= len(SHAPES):
        raise ValueError(
            f"Expected num_classes an int in [2, {len(SHAPES)}], but got {num_classes!r}."
        )
    if not 0.0 <= spurious <= 1.0:
        raise ValueError(f"Expected spurious in [0, 1], but got {spurious!r}.")
    if cue not in CUES:
        raise ValueError(f"Expected cue one of {CUES}, but got {cue!r}.")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    # marker: the shape keeps to the centre, a marker width (size // 8) from each edge
    margin = size // 8 if cue == "marker" else 0
    inner = size - 2 * margin
    r = inner * (0.22 + 0.12 * torch.rand(n, generator=g))
    cx = margin + r + (inner - 2 * r) * torch.rand(n, generator=g)
    cy = margin + r + (inner - 2 * r) * torch.rand(n, generator=g)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coords.view(1, -1, 1) - cy.view(-1, 1, 1)
    dx = coords.view(1, 1, -1) - cx.view(-1, 1, 1)
    masks = torch.zeros(n, size, size)
    for c in range(num_classes):
        idx = labels == c
        masks[idx] = _shape_mask(SHAPES[c], dx[idx], dy[idx], r[idx].view(-1, 1, 1)).float()
    other = (labels + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    agree = torch.rand(n, generator=g) < spurious
    tint_index = torch.where(agree, labels, other)
    texture = F.interpolate(
        torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=False
    )
    # A dim background and a bright shape: a tiny ViT trained from scratch learns the shapes in a
    # few hundred steps (with random, low-contrast colours it stays at chance for longer).
    background = 0.6 * (0.5 * _TINTS[tint_index].view(n, 3, 1, 1) + 0.5 * texture)
    colour = 0.7 + 0.3 * torch.rand(n, 3, 1, 1, generator=g)
    m = masks.unsqueeze(1)
    images = m * colour + (1 - m) * background
    if cue == "marker":
        corner = tint_index % 4  # the marker's corner follows the cue draw; the tint does not
        tint = (labels + torch.randint(0, num_classes, (n,), generator=g)) % num_classes
        background = 0.6 * (0.5 * _TINTS[tint].view(n, 3, 1, 1) + 0.5 * texture)
        images = m * colour + (1 - m) * background
        far = size - margin
        for i, (row, col) in enumerate(((0, 0), (0, far), (far, 0), (far, far))):
            images[corner == i, :, row : row + margin, col : col + margin] = 1.0
    return ShapesBatch(images=images, masks=masks, labels=labels, cues=tint_index)
