"""The batch contract: what every relreg dataset yields and every consumer reads.

:class:`Sample` is the one description of it; datasets, the data module, ``RelRegModule``, the
callbacks and ``relreg evaluate`` all take it. Any ``Dataset`` whose items are ``Sample`` dicts
plugs into :class:`relreg.data.RelRegDataModule`; batches are the same dicts with a leading batch
dimension (``image (B, 3, H, W)``, ``label (B,)``, ``mask (B, H, W)``, ``has_mask (B,)``).
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor

__all__ = ["Sample"]


class _Required(TypedDict):
    image: Tensor
    label: Tensor
    mask: Tensor
    has_mask: Tensor


class Sample(_Required, total=False):
    """One sample: ``image``, ``label``, ``mask`` and ``has_mask`` always; ``path``,
    ``label_set`` and ``group`` where the dataset has them.

    Attributes:
        image: ``(3, H, W)`` float, normalised as the model expects.
        label: ``()`` long, the class index in the model's label space.
        mask: ``(H, W)`` float in {0, 1}, the foreground; all zeros when there is none.
        has_mask: ``()`` bool, whether ``mask`` is a real foreground mask.
        path: the image file, for folders.
        label_set: ``(S,)`` long, every class that counts as right, padded with -1 (ObjectNet-style
            splits; see :func:`relreg.metrics.accuracy_targets`).
        group: ``()`` long, the sample's group in ``[0, dataset.num_groups)`` (Waterbirds:
            ``2 * y + place``; the generated benchmarks: ``label * num_cues + cue``), for the
            group accuracies (:class:`relreg.metrics.GroupAccuracy`).
    """

    path: str
    label_set: Tensor
    group: Tensor
