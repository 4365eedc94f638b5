"""Folder names to model class indices: the label space of image folders.

A folder maps to one class (training data, most OOD splits) or to a set of classes (ObjectNet,
whose classes each stand for one or more ImageNet classes). The label space is given as None
(sorted folder names), a list of names in the model's label order (e.g. the 1000 ImageNet wnids),
a text file of them, a ``.json`` mapping, an explicit mapping, or the name of a label space that
timm ships (:data:`LABEL_SPACES`: ``"imagenet"``, ``"imagenet-a"``, ``"imagenet-r"``,
``"imagenet-v2"``), so that nobody writes the ImageNet class list by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

__all__ = [
    "LABEL_SPACES",
    "ClassesLike",
    "class_index",
    "class_names",
    "class_sets",
    "label_names",
    "label_space",
    "split_classes_of",
]

# name -> what its folders are called; every index is into the 1000 ImageNet-1k classes
LABEL_SPACES = {
    "imagenet": (
        "the 1000 ImageNet-1k wnids, in the model's label order (timm's imagenet_synsets.txt)"
    ),
    "imagenet-a": "ImageNet-A's 200 wnids (timm's imagenet_a_synsets.txt), at their 1k indices",
    "imagenet-r": "ImageNet-R's 200 wnids (timm's imagenet_r_synsets.txt), at their 1k indices",
    "imagenet-v2": "ImageNet-V2's folders '0' ... '999', the 1k class indices themselves",
}


def _space_name(classes: object) -> str | None:
    """The :data:`LABEL_SPACES` key ``classes`` names, or None.

    Case and ``_`` for ``-`` are free (``imagenet_a``); ``ImageNet-1k`` is ``imagenet``.
    """
    if not isinstance(classes, str):
        return None
    name = classes.strip().lower().replace("_", "-")
    name = "imagenet" if name in ("imagenet-1k", "in1k", "imagenet1k") else name
    return name if name in LABEL_SPACES else None


@cache
def _info(subset: str = "imagenet-1k"):  # noqa: ANN202
    from timm.data import ImageNetInfo

    return ImageNetInfo(subset)


@cache
def _timm_list(filename: str) -> tuple[str, ...]:
    """A class list bundled with timm (``timm/data/_info/``), one entry per line."""
    import pkgutil

    data = pkgutil.get_data("timm.data", f"_info/{filename}")
    if data is None:  # pragma: no cover - timm without its data files
        raise FileNotFoundError(f"timm's bundled class list {filename!r} is missing.")
    return tuple(data.decode("utf-8").split())


def label_space(name: str) -> dict[str, int]:
    """``{folder name: ImageNet-1k class index}`` of a label space timm ships.

    Args:
        name: one of :data:`LABEL_SPACES` (``"imagenet"``, ``"imagenet-a"``, ``"imagenet-r"``,
            ``"imagenet-v2"``; ``_`` for ``-`` and ``imagenet-1k`` are accepted).

    Raises:
        ValueError: for another name; the message lists the known ones.

    Example:
        >>> label_space("imagenet")["n01443537"], len(label_space("imagenet-r"))
        (1, 200)
    """
    key = _space_name(name)
    if key is None:
        raise ValueError(f"Expected a label space in {sorted(LABEL_SPACES)}, but got {name!r}.")
    wnids = _info().label_names()
    if key == "imagenet-v2":
        return {str(i): i for i in range(len(wnids))}
    index = {w: i for i, w in enumerate(wnids)}
    if key == "imagenet":
        return index
    return {w: index[w] for w in _timm_list(key.replace("-", "_") + "_synsets.txt")}


def split_classes_of(classes: ClassesLike) -> tuple[int, ...] | None:
    """The model indices a named subset stands for (ImageNet-A/R: their 200), else None.

    Restricted scoring of such a split takes the argmax over all of them, also when a copy of the
    dataset lacks some class folders.
    """
    key = _space_name(classes)
    if key in ("imagenet-a", "imagenet-r"):
        return tuple(sorted(label_space(key).values()))
    return None


@cache
def imagenet_synonyms() -> tuple[tuple[str, ...], ...]:
    """Each ImageNet-1k class's names from timm's lemmas, in label order, first name first
    (``("goldfish", "Carassius auratus")``)."""
    return tuple(tuple(name.strip() for name in d.split(",")) for d in _info().label_descriptions())


def class_names(num_classes: int) -> list[str]:
    """Human-readable names of a classifier's outputs: timm's ImageNet lemmas for 1000 classes
    (``"goldfish"``), else ``"class 0"``, ``"class 1"``, ...
    """
    if num_classes == 1000:
        return [names[0] for names in imagenet_synonyms()]
    return [f"class {i}" for i in range(num_classes)]


def label_names(num_classes: int, class_to_idx: Mapping[str, int] | None = None) -> list[str]:
    """A display name per output: timm's ImageNet lemma for 1000 classes, else the dataset's
    folder mapped to the index (``class_to_idx``), else ``"class i"``."""
    names = class_names(num_classes)
    if num_classes != 1000:
        for folder, index in (class_to_idx or {}).items():
            if 0 <= index < num_classes:
                names[index] = folder
    return names


def dataset_label_names(dataset: object, num_classes: int) -> list[str]:
    """:func:`label_names` for a dataset: its ``class_to_idx`` (image folders), else its
    ``classes`` in label order (the generated benchmarks, Waterbirds, ImageNet-9), read through
    ``torch.utils.data.Subset``."""
    inner = getattr(dataset, "dataset", dataset)
    mapping = getattr(inner, "class_to_idx", None)
    if mapping is None and getattr(inner, "classes", None) is not None:
        mapping = {name: i for i, name in enumerate(inner.classes)}
    return label_names(num_classes, mapping)


# Order matters to jsonargparse, which tries the types in turn: with str first, YAML mappings and
# lists arrived as their string form; list[str] (not Sequence[str]) keeps a path from becoming
# a list of characters.
ClassesLike = Mapping[str, int | list[int]] | list[str] | str | os.PathLike | None


def class_sets(folders: Sequence[str], classes: ClassesLike) -> dict[str, tuple[int, ...]]:
    """Map folder names to the model class indices each folder counts as.

    Args:
        folders: the class folder names found on disk.
        classes: None (sorted folder names -> 0..C-1), a label space timm ships by name
            (:data:`LABEL_SPACES`, e.g. ``"imagenet"``), a list of names in the model's label order
            (e.g. the 1000 ImageNet wnids), a text file with one such name per line, a ``.json``
            file holding a mapping, or an explicit mapping ``{name: index}``; for OOD splits whose
            classes stand for several model classes (ObjectNet), ``{name: [index, ...]}``.

    Raises:
        ValueError: a folder that the given label space does not contain, or an empty or
            non-integer entry.
        FileNotFoundError: a class file that does not exist.
    """
    space = _space_name(classes)
    if space is not None:
        classes = label_space(space)
    elif isinstance(classes, str | os.PathLike):
        path = Path(classes)
        if not path.is_file():
            raise FileNotFoundError(
                f"Expected a class file (one name per line, or a .json mapping) or a label space "
                f"name ({', '.join(LABEL_SPACES)}; for OODImageFolder also objectnet, si-score), "
                f"but {str(path)!r} is neither."
            )
        classes = (
            json.loads(path.read_text()) if path.suffix == ".json" else path.read_text().split()
        )
    if classes is None:
        return {name: (i,) for i, name in enumerate(sorted(folders))}
    if isinstance(classes, Mapping):
        mapping = dict(classes)
    else:
        mapping = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(folders) - set(mapping))
    if unknown:
        what = f"label space {space!r} ({LABEL_SPACES[space]})" if space else "given label space"
        raise ValueError(
            f"Expected class folders from the {what}, but got unknown folders {unknown[:5]}."
        )
    out = {}
    for name in sorted(folders):
        value = mapping[name]
        indices = (
            tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
        )
        if not indices or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
        ):
            raise ValueError(
                f"Expected class {name!r} to map to an index >= 0 or a non-empty list of them, "
                f"but got {value!r}."
            )
        out[name] = indices
    return out


def class_index(folders: Sequence[str], classes: ClassesLike) -> dict[str, int]:
    """Map folder names to one class index each (see :func:`class_sets` for ``classes``).

    Raises:
        ValueError: as :func:`class_sets`, or a folder mapped to several classes (allowed for
            :class:`OODImageFolder` only).
    """
    sets = class_sets(folders, classes)
    many = sorted(name for name, s in sets.items() if len(s) > 1)
    if many:
        raise ValueError(
            f"Expected one class index per folder for training data, but {many[:3]} map to "
            "several; several classes per folder are for OODImageFolder (ObjectNet-style "
            "evaluation)."
        )
    return {name: s[0] for name, s in sets.items()}


def prompt_name(folder: str) -> str:
    """The class name a text prompt uses for a class folder: timm's first lemma for an ImageNet
    wnid (``"n01443537"`` -> ``"goldfish"``), else the folder name with ``_`` as spaces.

    Example:
        >>> prompt_name("n01443537"), prompt_name("golden_retriever")
        ('goldfish', 'golden retriever')
    """
    info = _info()
    if folder in set(info.label_names()):
        return info.label_name_to_description(folder).split(",")[0].strip()
    return folder.replace("_", " ")
