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

Each fraction is one batched forward pass over the whole batch (chunked by ``chunk_size``) under
``torch.no_grad``; only one perturbed copy of the batch exists at a time.
States are sums, so DDP results are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm.data
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from relreg.explain.tokens import to_pixels

__all__ = ["DeletionInsertionAUC", "PerturbationAUC"]

PAPER_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def black_fill(model: nn.Module) -> Tensor:
    """``(C,)`` value of black (0 in [0, 1] space) under the model's mean/std normalisation."""
    config = timm.data.resolve_model_data_config(model)
    mean, std = torch.tensor(config["mean"]), torch.tensor(config["std"])
    return -mean / std


def _unit_scores(maps: Tensor, size: tuple[int, int], unit: str, patch: tuple[int, int]) -> Tensor:
    """Relevance per removable unit, ``(B, U)``: pixels of the image or patches of the grid."""
    if unit == "pixel":
        return to_pixels(maps.detach().float(), size=size, normalize=False).flatten(1)
    grid = (size[0] // patch[0], size[1] // patch[1])
    m = maps.detach().float()
    if tuple(m.shape[-2:]) != grid:  # pixel maps: mean relevance of each patch
        m = F.adaptive_avg_pool2d(to_pixels(m, size=size, normalize=False)[:, None], grid)[:, 0]
    return m.flatten(1)


def _removal_ranks(scores: Tensor, most_relevant_first: bool) -> Tensor:
    """Rank ``(B, U)`` of each unit in the removal order (0 = removed first); ties keep index order."""
    order = scores.argsort(dim=1, descending=most_relevant_first, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def _to_pixel_mask(
    removed: Tensor, size: tuple[int, int], unit: str, patch: tuple[int, int]
) -> Tensor:
    """Boolean ``(N, 1, H, W)`` pixel mask from a unit mask ``(N, U)``."""
    n = removed.shape[0]
    if unit == "pixel":
        return removed.view(n, 1, *size)
    grid = (size[0] // patch[0], size[1] // patch[1])
    return removed.view(n, 1, *grid).repeat_interleave(patch[0], 2).repeat_interleave(patch[1], 3)


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
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected model to be a torch.nn.Module, but got {type(model).__name__}."
            )
        if unit not in ("pixel", "patch"):
            raise ValueError(f"Expected unit 'pixel' or 'patch', but got {unit!r}.")
        if target_mode not in ("label", "predicted"):
            raise ValueError(
                f"Expected target_mode 'label' or 'predicted', but got {target_mode!r}."
            )
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"Expected chunk_size an int >= 1, but got {chunk_size!r}.")
        # a plain attribute, not a submodule: the metric's state_dict holds no weights
        object.__setattr__(self, "_model", model)
        self.unit, self.target_mode, self.chunk_size = unit, target_mode, chunk_size
        self.fill = (
            black_fill(model) if fill is None else torch.as_tensor(fill, dtype=torch.float32)
        )
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if unit == "patch" and patch is None:
            raise ValueError("Expected a model with patch_embed.patch_size for unit='patch'.")
        self.patch = (int(patch[0]), int(patch[1])) if patch is not None else (1, 1)

    def _check(self, images: Tensor, maps: Tensor, target: Tensor | None) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ValueError(
                f"Expected images (B, C, H, W), but got {getattr(images, 'shape', type(images))}."
            )
        if not isinstance(maps, Tensor) or maps.ndim != 3 or maps.shape[0] != images.shape[0]:
            raise ValueError(
                f"Expected maps (B, h, w) for {images.shape[0]} images, but got {getattr(maps, 'shape', None)}."
            )
        for name, t in (("images", images), ("maps", maps)):
            if not torch.isfinite(t).all():
                raise ValueError(f"Expected finite {name}, but got NaN or Inf values.")
        if self.target_mode == "label" and (target is None or target.shape != (images.shape[0],)):
            raise ValueError(
                f"Expected target (B,) labels for target_mode='label', but got {getattr(target, 'shape', None)}."
            )

    def _prepare(
        self, images: Tensor, maps: Tensor, target: Tensor | None, most_relevant_first: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Check inputs; return the clean logits, the class per image and each unit's removal rank."""
        self._check(images, maps, target)
        logits = self._forward(images)
        scores = _unit_scores(
            maps.to(images.device), tuple(images.shape[-2:]), self.unit, self.patch
        )
        return logits, self._targets(logits, target), _removal_ranks(scores, most_relevant_first)

    def _forward(self, batch: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    self._model(batch[i : i + self.chunk_size])
                    for i in range(0, len(batch), self.chunk_size)
                ]
            )

    def _targets(self, logits: Tensor, target: Tensor | None) -> Tensor:
        return logits.argmax(1) if self.target_mode == "predicted" else target.to(logits.device)

    def _perturbed(
        self, images: Tensor, ranks: Tensor, fraction: float, insert: bool = False
    ) -> Tensor:
        """Images with the first ``fraction`` of units (by rank) replaced by ``fill``; with
        ``insert``, a ``fill`` canvas with those units revealed instead."""
        k = int(fraction * ranks.shape[1])
        chosen = _to_pixel_mask(ranks < k, tuple(images.shape[-2:]), self.unit, self.patch)
        fill = self.fill.to(images).view(1, -1, 1, 1).expand_as(images)
        return torch.where(chosen, images, fill) if insert else torch.where(chosen, fill, images)


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
        if mode not in ("positive", "negative"):
            raise ValueError(f"Expected mode 'positive' or 'negative', but got {mode!r}.")
        fr = [float(f) for f in fractions]
        if not fr or any(not 0 < f < 1 for f in fr) or fr != sorted(fr):
            raise ValueError(f"Expected increasing fractions in (0, 1), but got {fractions!r}.")
        self.mode, self.fractions = mode, fr
        # torchmetrics guards this class constant; here it depends on the mode
        object.__setattr__(self, "higher_is_better", mode == "negative")
        self.add_state(
            "correct", default=torch.zeros(len(fr) + 1, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, images: Tensor, maps: Tensor, target: Tensor | None = None) -> None:
        logits, tgt, ranks = self._prepare(images, maps, target, self.mode == "positive")
        # one batched (chunked) pass per fraction: memory stays at one perturbed copy of the batch
        preds = torch.stack(
            [self._forward(self._perturbed(images, ranks, f)).argmax(1) for f in self.fractions]
        )
        hits = torch.cat([(logits.argmax(1) == tgt)[None], preds == tgt[None]]).double().sum(1)
        self.correct += hits
        self.count += images.shape[0]

    def curve(self) -> Tensor:
        """Accuracy ``(F + 1,)`` at fraction 0 (unperturbed) and at each fraction, in [0, 1]."""
        return (self.correct / self.count.clamp_min(1)).float()

    def compute(self) -> Tensor:
        x = torch.tensor([0.0, *self.fractions], dtype=torch.float64, device=self.correct.device)
        return (torch.trapezoid(self.correct / self.count.clamp_min(1), x) * 100).float()


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
        if mode not in ("deletion", "insertion"):
            raise ValueError(f"Expected mode 'deletion' or 'insertion', but got {mode!r}.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Expected steps an int >= 1, but got {steps!r}.")
        self.mode, self.steps = mode, steps
        object.__setattr__(self, "higher_is_better", mode == "insertion")
        self.add_state(
            "prob_sum", default=torch.zeros(steps + 1, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, images: Tensor, maps: Tensor, target: Tensor | None = None) -> None:
        _, tgt, ranks = self._prepare(images, maps, target, most_relevant_first=True)
        insert = self.mode == "insertion"
        fractions = [i / self.steps for i in range(self.steps + 1)]
        probs = torch.stack(
            [self._forward(self._perturbed(images, ranks, f, insert)).softmax(1) for f in fractions]
        )
        self.prob_sum += (
            probs.gather(2, tgt.view(1, -1, 1).expand(len(fractions), -1, 1))[..., 0]
            .double()
            .sum(1)
        )
        self.count += images.shape[0]

    def curve(self) -> Tensor:
        """Mean class probability ``(steps + 1,)`` at fractions 0, 1/steps, ..., 1."""
        return (self.prob_sum / self.count.clamp_min(1)).float()

    def compute(self) -> Tensor:
        x = torch.linspace(0, 1, self.steps + 1, dtype=torch.float64, device=self.prob_sum.device)
        return torch.trapezoid(self.prob_sum / self.count.clamp_min(1), x).float()
