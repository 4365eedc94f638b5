"""Localization metrics as torchmetrics ``Metric``s: relevance maps against foreground masks.

``update(maps, masks)`` with maps ``(B, h, w)`` or ``(B, H, W)`` (upsampled to the masks) and
binary masks ``(B, H, W)``. States are sums (``dist_reduce_fx="sum"``), so the result under DDP is
exactly the result over all the data. The math is in :mod:`relreg.metrics.functional.localization`
(with the functional twins :func:`relevance_mass`, :func:`pointing_game`, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchmetrics import Metric

from relreg.metrics.functional.localization import (
    _localization_auc_update,
    _pointing_game_update,
    _relevance_mass_update,
    _relevance_rank_update,
    _segmentation_compute,
    _segmentation_update,
    _top_k_intersection_update,
    check_convention,
    check_top_k,
)

__all__ = [
    "LocalizationAUC",
    "PointingGame",
    "RelevanceMass",
    "RelevanceRankAccuracy",
    "SegmentationAgreement",
    "TopKIntersection",
]


class _PerImageMean(Metric):
    """Mean over images of a per-image score in [0, 1]; images scored NaN (no score defined,
    e.g. an empty mask) are left out."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    _per_image: Callable[[Tensor, Tensor], Tensor]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor, has_mask: Tensor | None = None) -> None:
        """Add a batch; images whose ``has_mask`` ``(B,)`` is False are skipped."""
        if has_mask is not None:
            keep = has_mask.bool().to(maps.device)
            maps = maps[keep]
            masks = masks[keep.to(masks.device)]
            if maps.shape[0] == 0:
                return
        scores = self._per_image(maps, masks)
        scores = scores[torch.isfinite(scores)]
        self.total += scores.double().sum()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        """The mean (0 before any image)."""
        return (self.total / self.count.clamp_min(1)).float()


class RelevanceMass(_PerImageMean):
    """Fraction of relevance inside the mask, averaged over images (Arras et al., 2022).

    Per image the share of the positive relevance inside the mask (the published relevance mass
    accuracy, ``convention="positive"``), or of the min-max normalised map
    (``convention="minmax"``, relreg's earlier convention); see
    :func:`relreg.metrics.relevance_share`.

    Args:
        convention: ``"positive"`` (default) or ``"minmax"``.
        **kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import torch
        >>> metric = RelevanceMass()
        >>> metric.update(torch.rand(4, 7, 7), (torch.rand(4, 28, 28) > 0.5).float())
        >>> 0.0 <= metric.compute().item() <= 1.0
        True
    """

    def __init__(self, convention: str = "positive", **kwargs) -> None:
        super().__init__(**kwargs)
        self.convention = check_convention(convention)

    def _per_image(self, maps: Tensor, masks: Tensor) -> Tensor:
        return _relevance_mass_update(maps, masks, self.convention)


class RelevanceRankAccuracy(_PerImageMean):
    """Fraction of the K most relevant pixels inside the mask, K = mask size (Arras et al., 2022).

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
        >>> RelevanceRankAccuracy()(maps, torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]))
        tensor(1.)
    """

    _per_image = staticmethod(_relevance_rank_update)


class PointingGame(_PerImageMean):
    """Fraction of images whose most relevant pixel is inside the mask (Zhang et al., ECCV 2016).

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
        >>> PointingGame()(maps, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
        tensor(0.)
    """

    _per_image = staticmethod(_pointing_game_update)


class TopKIntersection(_PerImageMean):
    """Share of the ``k`` most relevant pixels inside the mask, averaged over images (Theiner et
    al., WACV 2022; Quantus' ``TopKIntersection``); images with an empty mask are left out.

    Args:
        k: pixels (an int, Quantus' convention) or a share of the pixels (a float in (0, 1]).
        **kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[0.9, 0.8], [0.1, 0.0]]])
        >>> TopKIntersection(k=0.25)(maps, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
        tensor(1.)
    """

    def __init__(self, k: int | float = 1000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = check_top_k(k)

    def _per_image(self, maps: Tensor, masks: Tensor) -> Tensor:
        return _top_k_intersection_update(maps, masks, self.k)


class LocalizationAUC(_PerImageMean):
    """ROC AUC of the map's pixels as scores for the mask's, averaged over images (Quantus'
    ``AUC``); 0.5 is chance. Images whose mask is empty or full are left out.

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[0.9, 0.5], [0.5, 0.0]]])
        >>> LocalizationAUC()(maps, torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]))
        tensor(0.8750)
    """

    _per_image = staticmethod(_localization_auc_update)


class SegmentationAgreement(Metric):
    """Segmentation test of Chefer, Gur & Wolf (CVPR 2021): maps thresholded at their mean.

    ``compute()`` gives ``{"pixel_accuracy", "miou", "map"}``, fractions in [0, 1]: pixel accuracy
    and mIoU (background and foreground) accumulated over all pixels, mAP the mean over images
    (with a non-empty mask) of the soft map's average precision.

    Example:
        >>> import torch
        >>> metric = SegmentationAgreement()
        >>> maps = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
        >>> metric.update(maps, masks=maps.clone())
        >>> {k: v.item() for k, v in metric.compute().items()}
        {'pixel_accuracy': 1.0, 'miou': 1.0, 'map': 1.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name, default in (
            ("correct", torch.tensor(0.0, dtype=torch.float64)),
            ("total", torch.tensor(0.0, dtype=torch.float64)),
            ("intersection", torch.zeros(2, dtype=torch.float64)),
            ("union", torch.zeros(2, dtype=torch.float64)),
            ("ap_sum", torch.tensor(0.0, dtype=torch.float64)),
            ("ap_count", torch.tensor(0.0, dtype=torch.float64)),
        ):
            self.add_state(name, default=default, dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Add a batch: maps ``(B, h, w)`` or ``(B, H, W)``, binary masks ``(B, H, W)``."""
        for name, value in _segmentation_update(maps, masks).items():
            setattr(self, name, getattr(self, name) + value.double())

    def compute(self) -> dict[str, Tensor]:
        return _segmentation_compute(
            {
                k: getattr(self, k)
                for k in ("correct", "total", "intersection", "union", "ap_sum", "ap_count")
            }
        )
