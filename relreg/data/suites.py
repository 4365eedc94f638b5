"""Native layouts of OOD suites whose class mapping ships with the dataset: ObjectNet.

ObjectNet (Barbu et al., NeurIPS 2019) is distributed as ``objectnet-1.0/images/<folder>/<image>``
with ``objectnet-1.0/mappings/``:

- ``folder_to_objectnet_label.json``: ``{folder: ObjectNet label}`` (313 classes);
- ``objectnet_to_imagenet_1k.json``: ``{ObjectNet label: "ImageNet label; ImageNet label"}`` for the
  113 classes that overlap ImageNet-1k;
- ``imagenet_to_label_2012_v2``: the ImageNet labels, one per line;
- ``pytorch_to_imagenet_2012_id.json``: ``{model index: line of that file}``.

:func:`objectnet_label_sets` reads them into ``{folder: [model index, ...]}`` for the overlapping
folders (the others are not scored), as RobustViT's ``objectnet_dataset.py``
(hila-chefer/RobustViT) reads the same four files. One deliberate difference: RobustViT labels each
image with the first mapped ImageNet class only; relreg counts a prediction of any mapped class as
right (``label_set``; the ObjectNet paper's rule). ObjectNet's images carry a 1-pixel border that
the dataset's documentation says to remove: :class:`relreg.data.OODImageFolder` crops it
(``crop_border``) when ``classes="objectnet"``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["OBJECTNET_FILES", "is_objectnet", "objectnet_label_sets", "objectnet_mappings_dir"]

OBJECTNET_FILES = (
    "folder_to_objectnet_label.json",
    "objectnet_to_imagenet_1k.json",
    "imagenet_to_label_2012_v2",
    "pytorch_to_imagenet_2012_id.json",
)


def is_objectnet(classes: object) -> bool:
    """Whether ``classes`` asks for ObjectNet's own mapping files (``"objectnet"``)."""
    return isinstance(classes, str) and classes.strip().lower() == "objectnet"


def objectnet_mappings_dir(root: str | Path) -> Path:
    """``mappings/`` beside ``root`` (``objectnet-1.0/images``) or inside it (``objectnet-1.0``).

    Raises:
        FileNotFoundError: naming the folders looked in and the files expected there.
    """
    root = Path(root)
    for candidate in (root.parent / "mappings", root / "mappings"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"Expected ObjectNet's mappings folder (with {', '.join(OBJECTNET_FILES)}) at "
        f"{str(root.parent / 'mappings')!r} or {str(root / 'mappings')!r}, but found neither; "
        "give the root of the dataset as shipped (objectnet-1.0/images)."
    )


def _read(mappings: Path, name: str) -> object:
    path = mappings / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected ObjectNet's mapping file {str(path)!r} (shipped in objectnet-1.0/mappings), "
            "but it does not exist."
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return [line.rstrip("\n") for line in text.splitlines()]
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"Expected JSON in {str(path)!r}, but it does not parse: {err}") from err


def objectnet_label_sets(root: str | Path, folders: Sequence[str]) -> dict[str, list[int]]:
    """``{folder: sorted model indices}`` for the ``folders`` that overlap ImageNet-1k.

    Args:
        root: ObjectNet's image root (``objectnet-1.0/images``); the mapping files are read from
            :func:`objectnet_mappings_dir`.
        folders: the class folders found under ``root``.

    Returns:
        Only the overlapping folders (113 in the full dataset), each with the model indices of its
        ImageNet classes.

    Raises:
        FileNotFoundError: a mapping file that is missing (named).
        ValueError: a folder unknown to ``folder_to_objectnet_label.json``, an ImageNet label that
            ``imagenet_to_label_2012_v2`` lacks, or no overlapping folder at all.
    """
    mappings = objectnet_mappings_dir(root)
    folder_label, to_imagenet, lines, index_to_line = (_read(mappings, n) for n in OBJECTNET_FILES)
    unknown = sorted(set(folders) - set(folder_label))
    if unknown:
        raise ValueError(
            f"Expected ObjectNet class folders listed in "
            f"{str(mappings / OBJECTNET_FILES[0])!r}, but got unknown folders {unknown[:5]}."
        )
    line_to_index = {int(line): int(index) for index, line in index_to_line.items()}
    label_to_index = {
        label: line_to_index[i] for i, label in enumerate(lines) if i in line_to_index
    }
    out = {}
    for folder in sorted(folders):
        names = to_imagenet.get(folder_label[folder])
        if names is None:
            continue  # an ObjectNet class with no ImageNet-1k counterpart: not scored
        missing = [n for n in names.split("; ") if n not in label_to_index]
        if missing:
            raise ValueError(
                f"Expected the ImageNet labels of ObjectNet class {folder_label[folder]!r} in "
                f"{str(mappings / OBJECTNET_FILES[2])!r}, but {missing[:3]} are not there."
            )
        out[folder] = sorted(label_to_index[n] for n in names.split("; "))
    if not out:
        raise ValueError(
            f"Expected ObjectNet folders that overlap ImageNet-1k under {str(root)!r}, but none of "
            f"the {len(folders)} folders maps to an ImageNet class."
        )
    return out
