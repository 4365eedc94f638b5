"""Folder names to model class indices: the label space of image folders.

A folder maps to one class (training data, most OOD splits) or to a set of classes (ObjectNet,
whose classes each stand for one or more ImageNet classes). The label space is given as None
(sorted folder names), a list of names in the model's label order (e.g. the 1000 ImageNet wnids),
a text file of them, a ``.json`` mapping, or an explicit mapping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ClassesLike", "class_index", "class_sets"]


# Order matters to jsonargparse, which tries the types in turn: with str first, YAML mappings and
# lists arrived as their string form; list[str] (not Sequence[str]) keeps a path from becoming
# a list of characters.
ClassesLike = Mapping[str, int | list[int]] | list[str] | str | os.PathLike | None


def class_sets(folders: Sequence[str], classes: ClassesLike) -> dict[str, tuple[int, ...]]:
    """Map folder names to the model class indices each folder counts as.

    Args:
        folders: the class folder names found on disk.
        classes: None (sorted folder names -> 0..C-1), a list of names in the model's label order
            (e.g. the 1000 ImageNet wnids), a text file with one such name per line, a ``.json``
            file holding a mapping, or an explicit mapping ``{name: index}``; for OOD splits whose
            classes stand for several model classes (ObjectNet), ``{name: [index, ...]}``.

    Raises:
        ValueError: a folder that the given label space does not contain, or an empty or
            non-integer entry.
        FileNotFoundError: a class file that does not exist.
    """
    if isinstance(classes, str | os.PathLike):
        path = Path(classes)
        if not path.is_file():
            raise FileNotFoundError(
                f"Expected a class file (one name per line, or a .json mapping), but {str(path)!r} "
                "does not exist."
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
        raise ValueError(
            f"Expected class folders from the given label space, but got unknown folders {unknown[:5]}."
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
                f"Expected class {name!r} to map to an index >= 0 or a non-empty list of them, but got {value!r}."
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
            f"Expected one class index per folder for training data, but {many[:3]} map to several; "
            "several classes per folder are for OODImageFolder (ObjectNet-style evaluation)."
        )
    return {name: s[0] for name, s in sets.items()}
