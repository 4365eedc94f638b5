"""Data: image folders with masks, OOD folders, the SpuriousShapes benchmark, joint transforms.

Every dataset yields relreg's batch contract: ``{"image": (3, H, W) float, "label": long,
"mask": (H, W) float in {0, 1}, "has_mask": bool}`` (plus optional keys such as ``"path"``).
"""

from relreg.data.datamodule import EpochShuffleSampler, RelRegDataModule
from relreg.data.folders import (
    MaskedImageFolder,
    OODImageFolder,
    accuracy_targets,
    class_index,
    class_sets,
    restrict_logits,
)
from relreg.data.spurious import SPLITS, SpuriousShapes, write_shapes_folder
from relreg.data.synthetic import SHAPES, ShapesBatch, make_shapes
from relreg.data.transforms import eval_transform, train_transform

__all__ = [
    "SHAPES",
    "SPLITS",
    "MaskedImageFolder",
    "OODImageFolder",
    "EpochShuffleSampler",
    "RelRegDataModule",
    "ShapesBatch",
    "SpuriousShapes",
    "accuracy_targets",
    "class_index",
    "class_sets",
    "eval_transform",
    "make_shapes",
    "restrict_logits",
    "train_transform",
    "write_shapes_folder",
]
