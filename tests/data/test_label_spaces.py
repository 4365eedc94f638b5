"""Label spaces from timm's bundled class lists: nothing for the user to write by hand."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from timm.data import ImageNetInfo

from relreg.data import (
    OODImageFolder,
    class_index,
    class_names,
    label_space,
    objectnet_label_sets,
    split_classes_of,
)
from tests.trees import folder_tree, imagenet_s_tree, objectnet_tree

ROOT = Path(__file__).resolve().parents[2]


def _timm_indices(name: str) -> list[int]:
    return [int(i) for i in pkgutil.get_data("timm.data", f"_info/{name}").decode().split()]


def test_imagenet_is_timms_synset_order():
    space = label_space("imagenet")
    assert list(space) == ImageNetInfo().label_names() and list(space.values()) == list(range(1000))
    assert label_space("ImageNet_1k") == space


@pytest.mark.parametrize("subset", ["imagenet-a", "imagenet-r"])
def test_a_and_r_subsets_agree_with_timms_own_index_files(subset):
    # timm ships the subsets twice: as wnids and as 1k indices; the two must agree
    space = label_space(subset.replace("-", "_"))
    expected = _timm_indices(subset.replace("-", "_") + "_indices.txt")
    assert len(space) == 200 and list(space.values()) == expected
    assert split_classes_of(subset) == tuple(sorted(expected))
    assert split_classes_of("imagenet") is None and split_classes_of(None) is None


def _tree(root: Path, folders: list[str]) -> Path:
    return folder_tree(root, folders)


def test_ood_folder_by_label_space_name(tmp_path):
    r_wnids = list(label_space("imagenet-r"))
    ds = OODImageFolder(_tree(tmp_path / "r", r_wnids[:2]), classes="imagenet-r", img_size=8)
    index = label_space("imagenet")
    assert ds.class_to_idx == {w: index[w] for w in r_wnids[:2]}
    # restricted scoring takes all 200 ImageNet-R classes, also with folders missing
    assert ds.split_classes.tolist() == sorted(label_space("imagenet-r").values())
    v2 = OODImageFolder(_tree(tmp_path / "v2", ["3", "999"]), classes="imagenet-v2", img_size=8)
    assert v2.class_to_idx == {"3": 3, "999": 999} and v2.split_classes.tolist() == [3, 999]
    not_r = next(w for w in index if w not in label_space("imagenet-r"))
    with pytest.raises(ValueError, match=rf"label space 'imagenet-r'.*\['{not_r}'\]"):
        OODImageFolder(_tree(tmp_path / "bad", [not_r]), classes="imagenet-r", img_size=8)


def test_training_folders_by_name_and_unknown_names():
    assert class_index(["n01443537", "n01440764"], "imagenet") == {"n01443537": 1, "n01440764": 0}
    with pytest.raises(ValueError, match=r"label space in \['imagenet', 'imagenet-a'"):
        label_space("imagenet-b")


def test_class_names():
    names = class_names(1000)
    assert len(names) == 1000 and names[1] == "goldfish" and names[0] == "tench"
    assert class_names(3) == ["class 0", "class 1", "class 2"]


def test_paper_configs_ask_for_no_imagenet_class_file():
    config = yaml.safe_load((ROOT / "configs" / "paper" / "base.yaml").read_text())
    data = config["data"]
    splits = {"train": data["train"], "val": data["val"], **data["ood"]}
    named = {k: s["init_args"]["classes"] for k, s in splits.items()}
    assert named == {
        "train": "imagenet",
        "val": "imagenet",
        "imagenet_r": "imagenet-r",
        "imagenet_a": "imagenet-a",
        "imagenet_sketch": "imagenet",
        "imagenet_v2": "imagenet-v2",
        "objectnet": "objectnet",  # read from the dataset's own mappings/ folder
        "si_score_size": "si-score",  # object names matched to ImageNet class names
        "si_score_location": "si-score",
        "si_score_rotation": "si-score",
    }
    assert all(label_space(v) for k, v in named.items() if v not in ("objectnet", "si-score"))
    roots = [s["init_args"]["root"] for s in splits.values()]
    assert not [r for r in roots if not r.startswith("/path/to/")]  # only dataset roots to give
    assert torch.tensor(split_classes_of(named["imagenet_a"])).numel() == 200


def test_objectnet_in_its_shipped_layout(tmp_path):
    images = objectnet_tree(tmp_path)
    ds = OODImageFolder(images, classes="objectnet", scoring="restricted", transform=lambda x: x)
    # air freshener has no ImageNet-1k counterpart: not scored; the clock stands for two classes
    assert ds.class_sets == {"alarm_clock": (409, 530), "banana": (954,)}
    assert ds.split_classes.tolist() == [409, 530, 954] and len(ds) == 2
    sample = ds[0]
    assert sample["image"].shape == (3, 8, 8)  # the border is cropped: no red pixel left
    assert not (sample["image"][0] == 255).any() and sample["label_set"].tolist() == [409, 530]
    assert OODImageFolder(images, classes="objectnet", crop_border=0, transform=lambda x: x)[0][
        "image"
    ].shape == (3, 10, 10)


def test_objectnet_layout_errors_name_the_file(tmp_path):
    images = objectnet_tree(tmp_path)
    (images.parent / "mappings" / "pytorch_to_imagenet_2012_id.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"pytorch_to_imagenet_2012_id\.json"):
        OODImageFolder(images, classes="objectnet")
    images2 = objectnet_tree(tmp_path / "two")
    (images2 / "sofa").mkdir()
    Image.new("RGB", (4, 4)).save(images2 / "sofa" / "a.png")
    with pytest.raises(ValueError, match=r"folder_to_objectnet_label\.json.*\['sofa'\]"):
        OODImageFolder(images2, classes="objectnet")
    with pytest.raises(FileNotFoundError, match="mappings folder"):
        objectnet_label_sets(tmp_path / "nowhere", [])
    with pytest.raises(ValueError, match=r"crop_border an int >= 0"):
        OODImageFolder(images2, crop_border=-1)


def test_siscore_object_folders_map_to_imagenet_by_name(tmp_path):
    # spot checks against tensorflow_datasets/datasets/siscore/labels.py (IMAGENET_LABELS), the
    # authors' table: the ambiguous and irregular names included
    expected = {
        "missile": 657, "jeans": 608, "kite": 21, "hedgehog": 334, "ipod": 605,
        "pig": 341, "taxi": 468, "racket": 752, "flowerpot": 738, "banana": 954,
    }  # fmt: skip
    root = _tree(tmp_path / "rotation", sorted(expected))
    ds = OODImageFolder(root, classes="si-score", img_size=8)
    assert ds.class_to_idx == expected and ds.crop_border == 0
    with pytest.raises(ValueError, match=r"no single ImageNet class is named \['spaceship'\]"):
        OODImageFolder(_tree(tmp_path / "bad", ["spaceship"]), classes="si_score", img_size=8)


def test_evaluation_splits_are_recognised_by_layout(tmp_path):
    from relreg.data.files import detect_mask_format
    from relreg.data.suites import detect_label_space

    def kind(root):
        return detect_label_space(root, sorted(d.name for d in root.iterdir() if d.is_dir()))

    assert kind(objectnet_tree(tmp_path / "on")) == "objectnet"
    assert kind(folder_tree(tmp_path / "in", list(label_space("imagenet-r"))[:2])) == "imagenet"
    assert kind(folder_tree(tmp_path / "v2", ["0", "17", "999"])) == "imagenet-v2"
    assert kind(folder_tree(tmp_path / "si", ["banana", "jeans"])) == "si-score"
    assert kind(folder_tree(tmp_path / "own", ["cat", "n01443537"])) is None
    masks, _ = imagenet_s_tree(tmp_path / "s", ["n01443537"], files_per_class=1)
    assert detect_mask_format(masks) == "imagenet_s"
    grey = tmp_path / "grey" / "cat"
    grey.mkdir(parents=True)
    Image.new("L", (4, 4)).save(grey / "a.png")
    assert detect_mask_format(grey.parent) == "binary"
    assert detect_mask_format(tmp_path / "none") == "binary"
