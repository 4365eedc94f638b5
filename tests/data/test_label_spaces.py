"""Label spaces from timm's bundled class lists: nothing for the user to write by hand."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from timm.data import ImageNetInfo

from relreg.data import OODImageFolder, class_index, class_names, label_space, split_classes_of

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
    for name in folders:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (30, 60, 90)).save(root / name / "a.png")
    return root


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
    named = {k: s["init_args"]["classes"] for k, s in splits.items() if k != "objectnet"}
    assert named == {
        "train": "imagenet",
        "val": "imagenet",
        "imagenet_r": "imagenet-r",
        "imagenet_a": "imagenet-a",
        "imagenet_sketch": "imagenet",
        "imagenet_v2": "imagenet-v2",
    }
    assert all(label_space(v) for v in named.values())
    assert torch.tensor(split_classes_of(named["imagenet_a"])).numel() == 200
