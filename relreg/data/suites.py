"""Native layouts of OOD suites whose folders are not ImageNet wnids: ObjectNet and SI-Score.

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

SI-Score (Djolonga et al., "On Robustness and Transferability of Convolutional Neural Networks",
CVPR 2021) is distributed per factor of variation (``area/``, ``location20_area02_min0pc/``,
``rotation/``), each as ``<object name>/<id>.jpg`` with 61 object names (``banana``,
``ipod``, ...). :func:`siscore_classes` maps each name to the ImageNet-1k class whose name it is, by
timm's bundled class names: the class whose first name it is, else the one class that lists it as a
synonym, else the same for the singular (``jeans`` -> ``jean, blue jean, denim``). Checked against
the label table of tensorflow/datasets (``tensorflow_datasets/datasets/siscore/labels.py``), the
mapping the dataset's authors use (tests spot-check it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from relreg.data.classes import imagenet_synonyms

__all__ = [
    "OBJECTNET_FILES",
    "objectnet_label_sets",
    "detect_label_space",
    "objectnet_mappings_dir",
    "resolve_suite",
    "siscore_classes",
]

OBJECTNET_FILES = (
    "folder_to_objectnet_label.json",
    "objectnet_to_imagenet_1k.json",
    "imagenet_to_label_2012_v2",
    "pytorch_to_imagenet_2012_id.json",
)


def _suite(classes: object) -> str | None:
    if not isinstance(classes, str):
        return None
    name = classes.strip().lower().replace("_", "-")
    return {"objectnet": "objectnet", "si-score": "si-score", "siscore": "si-score"}.get(name)


def resolve_suite(classes: object, root: Path, folders: list[str]) -> tuple[object, list[str], int]:
    """For ``classes`` naming a suite (``"objectnet"``, ``"si-score"``): its label mapping, the
    folders to read and the border to crop; any other ``classes``: unchanged, all folders, 0."""
    suite = _suite(classes)
    if suite == "objectnet":  # non-overlapping classes are not scored
        sets = objectnet_label_sets(root, folders)
        return sets, sorted(sets), 1
    if suite == "si-score":
        return siscore_classes(folders), folders, 0
    return classes, folders, 0


def detect_label_space(root: Path, folders: Sequence[str]) -> str | None:
    """The label space of an evaluation split for a 1000-class model, read from its layout:
    ``"objectnet"`` (a ``mappings/`` folder beside ``images/`` with ObjectNet's files),
    ``"imagenet"`` (every folder an ImageNet-1k wnid), ``"imagenet-v2"`` (every folder a class
    index 0-999), ``"si-score"`` (every folder one of SI-Score's object names), else None."""
    from relreg.data.classes import label_space

    if (Path(root).parent / "mappings" / OBJECTNET_FILES[0]).is_file():
        return "objectnet"
    if not folders:
        return None
    if all(f in label_space("imagenet") for f in folders):
        return "imagenet"
    if all(f in label_space("imagenet-v2") for f in folders):
        return "imagenet-v2"
    try:
        siscore_classes(folders)
    except ValueError:
        return None
    return "si-score"


def siscore_classes(folders: Sequence[str]) -> dict[str, int]:
    """``{object name: ImageNet-1k index}`` for SI-Score's class folders (see the module docstring).

    Raises:
        ValueError: naming the folders no ImageNet class name matches (or matches ambiguously).
    """
    synonyms = [[s.lower() for s in names] for names in imagenet_synonyms()]
    out: dict[str, int] = {}
    bad = []
    for folder in folders:
        index = _match(folder.strip().lower(), synonyms)
        if index is None:
            bad.append(folder)
        else:
            out[folder] = index
    if bad:
        raise ValueError(
            f"Expected SI-Score object folders named after ImageNet classes, but no single "
            f"ImageNet class is named {bad[:5]}; pass classes as a mapping {{folder: index}}."
        )
    return out


def _match(name: str, synonyms: list[list[str]]) -> int | None:
    """The class whose first name is ``name``, else the one class listing it.

    Failing both, the same for the singular (``name`` without its final ``s``).
    """
    for candidate in (name, name[:-1] if name.endswith("s") else None):
        if candidate is None:
            continue
        first = [i for i, s in enumerate(synonyms) if s[0] == candidate]
        if len(first) == 1:
            return first[0]
        listed = [i for i, s in enumerate(synonyms) if candidate in s]
        if len(listed) == 1:
            return listed[0]
    return None


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
            f"{str(mappings / OBJECTNET_FILES[0])!r}, but got unknown folders {unknown[:5]} (the "
            "root is the dataset's images folder, objectnet-1.0/images)."
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
