"""Data: image folders with masks, OOD folders, the SpuriousShapes and SpuriousScenes benchmarks,
joint transforms.

Every dataset yields :class:`Sample` dicts, relreg's batch contract (:mod:`relreg.data.sample`).
"""

from relreg.data.classes import (
    LABEL_SPACES,
    class_index,
    class_names,
    class_sets,
    dataset_label_names,
    label_names,
    label_space,
    split_classes_of,
)
from relreg.data.datamodule import BalancedSampler, EpochShuffleSampler, RelRegDataModule
from relreg.data.eval_split import EvalSplit
from relreg.data.folders import MaskedImageFolder, OODImageFolder
from relreg.data.imagenet9 import ImageNet9, bg_gap, expand_imagenet9, is_imagenet9
from relreg.data.preprocessing import PREPROCESSING, FollowsModel, Preprocessing
from relreg.data.sample import Sample
from relreg.data.scenes import ScenesBatch, SpuriousScenes, make_scenes, write_scenes_folder
from relreg.data.shuffled import ShuffledLabels
from relreg.data.specs import load_split
from relreg.data.spurious import SPLITS, SpuriousShapes, write_shapes_folder
from relreg.data.suites import objectnet_label_sets
from relreg.data.synthetic import SHAPES, ShapesBatch, make_shapes
from relreg.data.transforms import eval_transform, train_transform
from relreg.data.waterbirds import Waterbirds

__all__ = [
    "LABEL_SPACES",
    "PREPROCESSING",
    "SHAPES",
    "SPLITS",
    "MaskedImageFolder",
    "OODImageFolder",
    "FollowsModel",
    "ImageNet9",
    "Preprocessing",
    "BalancedSampler",
    "EpochShuffleSampler",
    "EvalSplit",
    "RelRegDataModule",
    "Sample",
    "ScenesBatch",
    "ShapesBatch",
    "ShuffledLabels",
    "SpuriousScenes",
    "SpuriousShapes",
    "Waterbirds",
    "bg_gap",
    "expand_imagenet9",
    "is_imagenet9",
    "class_index",
    "class_names",
    "class_sets",
    "dataset_label_names",
    "label_names",
    "label_space",
    "split_classes_of",
    "eval_transform",
    "load_split",
    "make_scenes",
    "make_shapes",
    "objectnet_label_sets",
    "train_transform",
    "write_scenes_folder",
    "write_shapes_folder",
]
