"""How images are resized, cropped and normalised for a model: its own timm ``pretrained_cfg`` by
default, or RobustViT's fixed convention.

The choice changes the numbers: DeiT weights expect ImageNet's mean and std and bicubic resizing,
while RobustViT (Chefer, Schwartz & Wolf, NeurIPS 2022; ``hila-chefer/RobustViT``) feeds every
model ``Resize(256)``, ``CenterCrop(224)`` and mean = std = 0.5. Datasets built with
``preprocessing="model"`` (the default of :class:`relreg.data.MaskedImageFolder` and
:class:`relreg.data.OODImageFolder`) take the model's settings when one is attached
(:meth:`FollowsModel.follow_model`; :class:`relreg.data.RelRegDataModule` does it in ``setup``,
``relreg evaluate`` when it loads the data) and use RobustViT's convention until then.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import timm.data
from torch import nn
from torchvision.transforms import v2

from relreg.data.classes import ClassesLike, label_space
from relreg.data.transforms import eval_transform, train_transform
from relreg.validate import check_choice, check_positive_int

__all__ = ["PREPROCESSING", "FollowsModel", "Preprocessing"]

PREPROCESSING = ("model", "robustvit")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """Resize, crop and normalisation settings.

    Evaluation: resize the shorter side to ``resize``, centre crop ``img_size`` (``squash``: resize
    to ``resize x resize`` first). Training: resize to ``resize x resize``, random crop
    ``img_size``, horizontal flip (RobustViT's recipe, with the model's crop ratio). Masks are
    resized with nearest neighbours.

    Attributes:
        img_size: output side length.
        resize: side the image is resized to before the crop (timm: ``floor(img_size / crop_pct)``).
        mean, std: per-channel normalisation.
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"`` (images only).
        squash: resize both sides to ``resize`` for evaluation (timm's ``crop_mode="squash"``).
        source: where the settings come from, for reports: ``"robustvit"`` or
            ``"model:<architecture>.<tag>"``.
    """

    img_size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"
    squash: bool = False
    source: str = "robustvit"

    def __post_init__(self) -> None:
        check_positive_int("img_size", self.img_size)
        check_positive_int("resize", self.resize)
        check_choice("interpolation", self.interpolation, _INTERPOLATIONS)
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or (name == "std" and min(value) <= 0):
                raise ValueError(f"Expected {name} of 3 channels (std > 0), but got {value}.")
            object.__setattr__(self, name, value)

    @classmethod
    def robustvit(cls, img_size: int = 224) -> Preprocessing:
        """RobustViT's convention: resize 256 / 224 of ``img_size``, bilinear, mean = std = 0.5."""
        return cls(img_size, int(round(img_size * 256 / 224)))

    @classmethod
    def from_model(cls, model: nn.Module, img_size: int | None = None) -> Preprocessing:
        """The settings of a timm model's ``pretrained_cfg`` (mean, std, crop ratio,
        interpolation), at its own input size (``patch_embed.img_size``) unless ``img_size``."""
        config = timm.data.resolve_model_data_config(model)
        if img_size is None:
            size = getattr(getattr(model, "patch_embed", None), "img_size", None)
            size = tuple(size) if size is not None else tuple(config["input_size"][1:])
            if size[0] != size[1]:
                raise ValueError(f"Expected a model with square inputs, but it takes {size}.")
            img_size = int(size[0])
        mode = config.get("crop_mode", "center")
        if mode not in ("center", "squash"):
            log.warning("crop_mode %r of the model is read as 'center'.", mode)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        name = ".".join(str(p) for p in (cfg.get("architecture"), cfg.get("tag")) if p)
        interpolation = config.get("interpolation", "bilinear")
        return cls(
            img_size,
            math.floor(img_size / float(config.get("crop_pct", 0.875))),
            config["mean"],
            config["std"],
            interpolation if interpolation in _INTERPOLATIONS else "bicubic",
            mode == "squash",
            f"model:{name or type(model).__name__}",
        )

    def train_transform(self, flip: bool = True) -> v2.Compose:
        """Joint ``(tv_tensors.Image, tv_tensors.Mask) -> (image, mask)`` training transform."""
        return train_transform(
            self.img_size, self.mean, self.std, flip, self.resize, self.interpolation
        )

    def eval_transform(self) -> v2.Compose:
        """Joint (or image-only) evaluation transform."""
        return eval_transform(
            self.img_size, self.mean, self.std, self.resize, self.interpolation, self.squash
        )

    def describe(self) -> dict:
        """The settings as a JSON-ready dict (for reports and logged hyperparameters)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class FollowsModel:
    """Mixin of the image-folder datasets: a transform from :class:`Preprocessing`, resolved
    against a model by :meth:`follow_model` when built with ``preprocessing="model"``.

    Subclasses call :meth:`_init_preprocessing` in ``__init__``; a dataset given its own
    ``transform`` keeps it (``preprocessing`` is then None).
    """

    train: bool = False
    preprocessing: Preprocessing | None
    transform: Callable

    def _init_preprocessing(
        self,
        preprocessing: str | Preprocessing,
        img_size: int | None,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        transform: Callable | None,
    ) -> None:
        if not isinstance(preprocessing, Preprocessing):
            check_choice("preprocessing", preprocessing, PREPROCESSING)
        check_positive_int("img_size", img_size, allow_none=True)
        self._overrides = {
            k: tuple(v) if k != "img_size" else v
            for k, v in (("img_size", img_size), ("mean", mean), ("std", std))
            if v is not None
        }
        self.awaiting_model = preprocessing == "model" and transform is None
        if transform is not None:
            self.preprocessing = None
            self.transform = transform
            return
        base = (
            preprocessing
            if isinstance(preprocessing, Preprocessing)
            else Preprocessing.robustvit(img_size or 224)
        )
        self._use(base)

    def _use(self, base: Preprocessing) -> None:
        pre = replace(base, **self._overrides)
        if "img_size" in self._overrides and pre.img_size != base.img_size:
            pre = replace(pre, resize=round(base.resize * pre.img_size / base.img_size))
        self.preprocessing = pre
        self.transform = pre.train_transform() if self.train else pre.eval_transform()

    def follow_model(self, model: nn.Module) -> bool:
        """Take ``model``'s preprocessing (and its label space) if the dataset was built with
        ``preprocessing="model"``; explicit ``img_size`` / ``mean`` / ``std`` still win.

        A dataset with ``classes=None`` whose class folders are all ImageNet wnids is mapped
        through timm's ImageNet-1k order when the model has 1,000 outputs.

        Returns:
            Whether anything changed.
        """
        changed = False
        if self.awaiting_model:
            self._use(Preprocessing.from_model(model))
            self.awaiting_model = False
            changed = True
        if getattr(model, "num_classes", None) == 1000 and self._relabel_imagenet():
            changed = True
        return changed

    def _relabel_imagenet(self) -> bool:
        """Map wnid folders through timm's ImageNet order when ``classes`` was None."""
        return False

    def preprocessing_info(self) -> dict:
        """What the dataset's transform is, for reports: :meth:`Preprocessing.describe`, or
        ``{"source": "custom transform"}``; notes ``awaiting_model`` while unresolved."""
        if self.preprocessing is None:
            return {"source": "custom transform"}
        info = self.preprocessing.describe()
        if self.awaiting_model:
            info["source"] += " (preprocessing='model' not resolved: no model followed yet)"
        return info


def imagenet_wnid_folders(folders: Sequence[str], classes: ClassesLike) -> bool:
    """Whether ``classes`` is None and every folder name is an ImageNet-1k wnid."""
    if classes is not None:
        return False
    wnids = set(label_space("imagenet"))
    return bool(folders) and all(f in wnids for f in folders)
