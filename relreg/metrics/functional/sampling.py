"""Per-sample random draws for the randomised metrics, independent of how batches fall.

A randomised metric (faithfulness correlation's subsets, and the noise of ROAD, infidelity and the
sensitivities as they land) draws each sample's randomness from a generator of its own, seeded by
the metric's ``seed`` and a key of the sample: its dataset index where the caller passes
``indices``, else the bytes of the image itself. Either way a sample gets the same draws whatever
batch it falls in and whichever DDP rank sees it, so that a metric's result over a dataset does
not depend on the batch size or the number of processes, and a summed state stays exact under
DDP. (Keyed on the content, two identical images get the same draws: harmless for a mean.)

Draws are made on the CPU and moved to the images' device, so a GPU run draws what a CPU run
draws.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["sample_generators", "sample_seeds"]


def sample_seeds(images: Tensor, seed: int, indices: Tensor | None = None) -> list[int]:
    """One 63-bit seed per sample of ``images`` ``(B, ...)``.

    Args:
        images: the batch.
        seed: the metric's seed.
        indices: ``(B,)`` dataset indices of the samples, or None: key on each image's bytes.

    Returns:
        ``B`` ints.

    Example:
        >>> import torch
        >>> x = torch.rand(3, 3, 4, 4)
        >>> sample_seeds(x, 0)[1:] == sample_seeds(x[1:], 0)  # a sample's seed ignores its batch
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Expected seed an int, but got {seed!r}.")
    if indices is not None:
        if not isinstance(indices, Tensor) or indices.shape != (images.shape[0],):
            raise ValueError(
                f"Expected indices ({images.shape[0]},) dataset indices, but got "
                f"{getattr(indices, 'shape', type(indices).__name__)}."
            )
        keys = [f"index:{int(i)}".encode() for i in indices.tolist()]
    else:
        flat = images.detach().to("cpu", torch.float32).contiguous()
        keys = [b"image:" + x.numpy().tobytes() for x in flat]
    return [
        int.from_bytes(
            hashlib.blake2b(str(seed).encode() + b"|" + key, digest_size=8).digest(), "little"
        )
        >> 1
        for key in keys
    ]


def sample_generators(
    images: Tensor, seed: int, indices: Tensor | None = None
) -> list[torch.Generator]:
    """A CPU ``torch.Generator`` per sample, seeded by :func:`sample_seeds`."""
    return [torch.Generator().manual_seed(s) for s in sample_seeds(images, seed, indices)]
