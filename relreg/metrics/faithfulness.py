"""Faithfulness metrics: does removing what a map calls relevant change the model's decision?

- :class:`PerturbationAUC`: the perturbation test of Chefer, Gur & Wolf, "Transformer
  Interpretability Beyond Attention Visualization", CVPR 2021. For each fraction p in 0.1 ... 0.9
  the top-p pixels (``positive``: most relevant first; ``negative``: least relevant first) are set
  to ``fill`` on all channels; top-1 accuracy against the label or the unperturbed prediction;
  AUC by the trapezoid rule over x = 0, 0.1, ..., 0.9 (x = 0 unperturbed), times 100.
  Positive: lower is better; negative: higher is better. ``unit="patch"`` removes whole patches.
- :class:`DeletionInsertionAUC`: Petsiuk, Das & Saenko, "RISE", BMVC 2018: mean softmax
  probability of the class as the most relevant pixels are deleted (lower is better) or inserted
  into a ``fill`` canvas (higher is better), AUC over fractions 0 ... 1.
- :class:`FlippingArea`: AttnLRP's faithfulness (Achtibat et al., ICML 2024): the area between
  the least- and the most-relevant-first curves of the class logit as patches are removed
  (higher is better).
- :class:`FaithfulnessCorrelation`: Bhatt, Weller & Moura, IJCAI 2020: the correlation, over
  random subsets of pixels, between their relevance and the logit's drop when they are removed
  (higher is better); each sample's subsets are its own (seeded per sample).

The math is in :mod:`relreg.metrics.functional.faithfulness` (with the functional twins
:func:`perturbation_auc` and :func:`deletion_insertion_auc`); each fraction is one batched forward
pass over the whole batch. States are sums, so DDP results are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from relreg.metrics.functional.faithfulness import (
    PAPER_FRACTIONS,
    _check_fractions,
    _check_mode,
    _faithfulness_correlation_update,
    _flipping_compute,
    _flipping_update,
    _perturbation_compute,
    _perturbation_update,
    _perturber,
    _rise_compute,
    _rise_update,
    check_subset,
)
from relreg.validate import check_positive_int

__all__ = ["DeletionInsertionAUC", "FaithfulnessCorrelation", "FlippingArea", "PerturbationAUC"]


class _ModelMetric(Metric):
    """Shared set-up of the model-based metrics."""

    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        model: nn.Module,
        unit: str,
        fill: float | Sequence[float] | Tensor | None,
        target_mode: str,
        chunk_size: int,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        # a plain attribute, not a submodule: the metric's state_dict holds no weights
        object.__setattr__(self, "_p", _perturber(model, unit, fill, target_mode, chunk_size))
        self.unit = unit
        self.target_mode = target_mode
        self.chunk_size = chunk_size


class PerturbationAUC(_ModelMetric):
    """Perturbation test AUC (x100) of Chefer et al. (CVPR 2021), batched.

    Args:
        model: the classifier (called under ``torch.no_grad``; its mode is left as it is).
        mode: ``"positive"`` (most relevant removed first; lower is better) or ``"negative"``.
        unit: ``"pixel"`` or ``"patch"`` (whole patches, natural for ViTs).
        fill: value written into the model's input for removed pixels: a float, a ``(C,)``
            sequence, or None for black under the model's normalisation.
        target_mode: accuracy against ``"predicted"`` (the unperturbed top-1) or ``"label"``.
        fractions: removed fractions (paper: 0.1 ... 0.9).
        chunk_size: images per forward pass.

    ``update(images (B, C, H, W), maps (B, h, w) or (B, H, W), target (B,) or None)``;
    ``compute()`` is the AUC x 100; :meth:`curve` the accuracy at 0 and each fraction.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> metric = PerturbationAUC(model, mode="negative")
        >>> metric.update(torch.randn(2, 3, 32, 32), torch.rand(2, 4, 4), torch.tensor([0, 1]))
        >>> 0.0 <= metric.compute().item() <= 90.0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "positive",
        unit: str = "pixel",
        fill: float | Sequence[float] | Tensor | None = None,
        target_mode: str = "predicted",
        fractions: Sequence[float] = PAPER_FRACTIONS,
        chunk_size: int = 64,
        **kwargs,
    ) -> None:
        super().__init__(model, unit, fill, target_mode, chunk_size, **kwargs)
        _check_mode(mode, ("positive", "negative"))
        fr = _check_fractions(fractions)
        self.mode = mode
        self.fractions = fr
        # torchmetrics guards this class constant; here it depends on the mode
        object.__setattr__(self, "higher_is_better", mode == "negative")
        self.add_state(
            "correct", default=torch.zeros(len(fr) + 1, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, images: Tensor, maps: Tensor, target: Tensor | None = None) -> None:
        self.correct += _perturbation_update(
            self._p, images, maps, target, self.mode, self.fractions
        )
        self.count += images.shape[0]

    def curve(self) -> Tensor:
        """Accuracy ``(F + 1,)`` at fraction 0 (unperturbed) and at each fraction, in [0, 1]."""
        return (self.correct / self.count.clamp_min(1)).float()

    def compute(self) -> Tensor:
        return _perturbation_compute(self.correct, self.count, self.fractions)


class DeletionInsertionAUC(_ModelMetric):
    """RISE deletion / insertion AUC (Petsiuk et al., BMVC 2018): mean class probability over the
    fraction of pixels (or patches) deleted from the image or inserted into a ``fill`` canvas,
    most relevant first; trapezoid rule over ``steps + 1`` fractions from 0 to 1.

    Deletion: lower is better; insertion: higher is better. Arguments as :class:`PerturbationAUC`.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> metric = DeletionInsertionAUC(model, mode="insertion", steps=4)
        >>> metric.update(torch.randn(2, 3, 32, 32), torch.rand(2, 4, 4))
        >>> 0.0 <= metric.compute().item() <= 1.0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "deletion",
        unit: str = "pixel",
        fill: float | Sequence[float] | Tensor | None = None,
        target_mode: str = "predicted",
        steps: int = 10,
        chunk_size: int = 64,
        **kwargs,
    ) -> None:
        super().__init__(model, unit, fill, target_mode, chunk_size, **kwargs)
        _check_mode(mode, ("deletion", "insertion"))
        check_positive_int("steps", steps)
        self.mode = mode
        self.steps = steps
        object.__setattr__(self, "higher_is_better", mode == "insertion")
        self.add_state(
            "prob_sum", default=torch.zeros(steps + 1, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, images: Tensor, maps: Tensor, target: Tensor | None = None) -> None:
        self.prob_sum += _rise_update(self._p, images, maps, target, self.mode, self.steps)
        self.count += images.shape[0]

    def curve(self) -> Tensor:
        """Mean class probability ``(steps + 1,)`` at fractions 0, 1/steps, ..., 1."""
        return (self.prob_sum / self.count.clamp_min(1)).float()

    def compute(self) -> Tensor:
        return _rise_compute(self.prob_sum, self.count, self.steps)


class FlippingArea(_ModelMetric):
    """AttnLRP's faithfulness (Achtibat et al., ICML 2024): the area between the
    least-relevant-first and the most-relevant-first curves of the explained class's logit as
    patches (or pixels) are set to ``fill``, fractions 0, 1/steps, ..., 1; see
    :func:`relreg.metrics.functional.flipping_area`. Higher is better.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> metric = FlippingArea(model, steps=4)
        >>> metric.update(torch.randn(2, 3, 32, 32), torch.rand(2, 4, 4))
        >>> metric.compute().shape
        torch.Size([])
    """

    higher_is_better = True

    def __init__(
        self,
        model: nn.Module,
        unit: str = "patch",
        fill: float | Sequence[float] | Tensor | None = None,
        target_mode: str = "predicted",
        steps: int = 16,
        chunk_size: int = 64,
        **kwargs,
    ) -> None:
        super().__init__(model, unit, fill, target_mode, chunk_size, **kwargs)
        check_positive_int("steps", steps)
        self.steps = steps
        self.add_state(
            "diff_sum", default=torch.zeros(steps + 1, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, images: Tensor, maps: Tensor, target: Tensor | None = None) -> None:
        self.diff_sum += _flipping_update(self._p, images, maps, target, self.steps)
        self.count += images.shape[0]

    def curve(self) -> Tensor:
        """Mean ``logit_LeRF - logit_MoRF`` ``(steps + 1,)`` at fractions 0, 1/steps, ..., 1."""
        return (self.diff_sum / self.count.clamp_min(1)).float()

    def compute(self) -> Tensor:
        return _flipping_compute(self.diff_sum, self.count, self.steps)


class FaithfulnessCorrelation(_ModelMetric):
    """Faithfulness correlation (Bhatt et al., IJCAI 2020), averaged over images; in [-1, 1].

    Per image, ``runs`` random subsets of ``subset`` units: the Pearson correlation between the
    relevance each subset holds and the drop of the class logit when it is set to ``fill``.
    Images without a defined correlation are left out. Conventions against Quantus:
    :mod:`relreg.metrics.functional.faithfulness`.

    Args:
        model: the classifier (called under ``torch.no_grad``).
        runs: subsets per image (forward passes per image).
        subset: units per subset: an int, or a share of the units (a float in (0, 1)).
        unit: ``"pixel"`` or ``"patch"``.
        fill: the removed units' value (None: black under the model's normalisation).
        target_mode: ``"predicted"`` or ``"label"``.
        seed: the draws' seed; each sample's subsets come from ``(seed, its key)``
            (:func:`relreg.metrics.functional.sampling.sample_seeds`).
        chunk_size: images per forward pass.
        **kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> metric = FaithfulnessCorrelation(model, runs=8, subset=0.1)
        >>> metric.update(torch.randn(2, 3, 32, 32), torch.rand(2, 4, 4))
        >>> -1 <= metric.compute().item() <= 1
        True
    """

    higher_is_better = True

    def __init__(
        self,
        model: nn.Module,
        runs: int = 100,
        subset: int | float = 224 / 224**2,
        unit: str = "pixel",
        fill: float | Sequence[float] | Tensor | None = None,
        target_mode: str = "predicted",
        seed: int = 0,
        chunk_size: int = 64,
        **kwargs,
    ) -> None:
        super().__init__(model, unit, fill, target_mode, chunk_size, **kwargs)
        check_positive_int("runs", runs)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected seed an int, but got {seed!r}.")
        self.runs, self.subset, self.seed = runs, check_subset(subset), seed
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        images: Tensor,
        maps: Tensor,
        target: Tensor | None = None,
        indices: Tensor | None = None,
    ) -> None:
        """Add a batch; ``indices`` ``(B,)``: dataset indices to key each sample's draws on."""
        scores = _faithfulness_correlation_update(
            self._p, images, maps, target, self.runs, self.subset, self.seed, indices
        )
        scores = scores[torch.isfinite(scores)]
        self.total += scores.sum()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        """The mean (NaN before any image with a defined correlation)."""
        if not int(self.count):
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()
