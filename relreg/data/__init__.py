"""Data: image folders with masks, OOD folders, the SpuriousShapes benchmark, joint transforms.

Every dataset yields :class:`Sample` dicts, relreg's batch contract (:mod:`relreg.data.sample`).
"""

from relreg.data.classes import class_index, class_sets
from relreg.data.datamodule import EpochShuffleSampler, RelRegDataModule
from relreg.data.folders import MaskedImageFolder, OODImageFolder
from relreg.data.sample import Sample
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
    "Sample",
    "ShapesBatch",
    "SpuriousShapes",
    "class_index",
    "class_sets",
    "eval_transform",
    "make_shapes",
    "train_transform",
    "write_shapes_folder",
]
