"""What one training or evaluation step knows: the batch, and everything terms may ask of it.

Each value is computed on first access and kept for the rest of the step, so the terms that ask
for the same thing share one computation (the relevance maps and the logits come from one
explained forward pass). The order of first access, which is the order of the terms in the
objective, is the order in which the autograd graph is built; relreg's configs list terms in one
fixed order so that runs reproduce digit for digit.

With the maps on, only the samples that have a mask go through the explainer (one more backward
pass for the attention gradients); the others take the model's plain forward pass. ViTs have no
batch-coupled layers, so the split changes no value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from relreg.explain import Explanation, explain_with_logits, to_pixels
from relreg.losses import swap_backgrounds

__all__ = ["ExplainerSpec", "StepContext"]


@dataclass(frozen=True)
class ExplainerSpec:
    """How a step computes the relevance maps that terms train.

    Attributes:
        method: a registered differentiable explainer (``"chefer"``).
        options: its keyword options (``{"gradient": "logits"}``).
        second_order: differentiate through the attention gradients too (RobustViT: False).
        normalize: min-max normalise each map when it is brought to pixels (RobustViT's loss
            does; RRR's raw input gradients do not).
    """

    method: str = "chefer"
    options: dict[str, Any] = field(default_factory=dict)
    second_order: bool = False
    normalize: bool = True


class StepContext:
    """The batch of one step and, lazily, what the objective's terms need of it.

    Args:
        model: the classifier, ``(B, C, H, W) -> (B, K)``.
        batch: ``image`` ``(B, C, H, W)``, ``label`` ``(B,)``, ``mask`` ``(B, H, W)`` and
            ``has_mask`` ``(B,)``.
        explainer: how the maps are computed.
        maps_on: whether this step computes relevance maps (for the masked samples).
        training: a training step (terms with ``in_validation=False`` run only then).
    """

    def __init__(
        self,
        model: nn.Module,
        batch: dict[str, Tensor],
        explainer: ExplainerSpec,
        maps_on: bool,
        training: bool,
    ) -> None:
        self.model = model
        self.batch = batch
        self.explainer = explainer
        self.training = training
        has_mask = batch["has_mask"].bool()
        self.masked: Tensor = has_mask.nonzero().flatten()
        self.rest: Tensor = (~has_mask).nonzero().flatten()
        self.num_masked = int(self.masked.numel())
        self.maps_on = maps_on and self.num_masked > 0

    @property
    def images(self) -> Tensor:
        """``(B, C, H, W)`` the batch's images."""
        return self.batch["image"]

    @property
    def labels(self) -> Tensor:
        """``(B,)`` the batch's classes."""
        return self.batch["label"]

    @property
    def groups(self) -> Tensor:
        """``(B,)`` the batch's groups (``Sample.group``)."""
        if "group" not in self.batch:
            raise ValueError(
                "Expected batches with 'group' for this objective (a dataset with groups: "
                f"Waterbirds, SpuriousShapes, ...), but the batch has only {sorted(self.batch)}."
            )
        return self.batch["group"]

    @property
    def _whole(self) -> bool:
        return self.rest.numel() == 0

    def _of_masked(self, values: Tensor) -> Tensor:
        return values if self._whole else values[self.masked]

    @cached_property
    def masks(self) -> Tensor:
        """``(M, H, W)`` the masks of the masked samples."""
        return self._of_masked(self.batch["mask"])

    @cached_property
    def explanation(self) -> Explanation:
        """The explainer's maps and logits of the masked samples, in the autograd graph."""
        if not self.maps_on:
            raise RuntimeError("Expected a step with the maps on, but this step computes none.")
        with torch.enable_grad():
            return explain_with_logits(
                self.model,
                self._of_masked(self.images),
                self.explainer.method,
                target=self._of_masked(self.labels),
                differentiable=True,
                second_order=self.explainer.second_order,
                **self.explainer.options,
            )

    @property
    def maps(self) -> Tensor:
        """``(M, gh, gw)`` or ``(M, H, W)`` the raw maps of the masked samples' labels."""
        return self.explanation.maps

    @cached_property
    def pixels(self) -> Tensor:
        """``(M, H, W)`` the maps at the masks' resolution (see ``ExplainerSpec.normalize``)."""
        size = self.masks.shape[-2:]
        return to_pixels(self.maps, size=size, normalize=self.explainer.normalize)

    @cached_property
    def logits(self) -> Tensor:
        """``(B, K)`` the logits of the batch: the explained pass's rows for masked samples."""
        if not self.maps_on:
            return self.model(self.images)
        if self._whole:
            return self.explanation.logits
        rest = self.model(self.images[self.rest])
        return _merge(self.explanation.logits, self.masked, rest, self.rest)

    @property
    def masked_logits(self) -> Tensor:
        """``(M, K)`` the logits of the masked samples (the explained pass's, with the maps on)."""
        return self.explanation.logits if self.maps_on else self.logits[self.masked]

    @cached_property
    def swapped_logits(self) -> Tensor:
        """``(M, K)`` logits of the masked samples with their backgrounds swapped in the batch."""
        images = self.images[self.masked]
        masks = self.batch["mask"][self.masked].to(images.dtype)
        return self.model(swap_backgrounds(images, masks))


def _merge(first: Tensor, first_index: Tensor, second: Tensor, second_index: Tensor) -> Tensor:
    """Rows of two tensors put back in batch order: ``out[first_index] = first`` and so on."""
    out = first.new_empty((first.shape[0] + second.shape[0], *first.shape[1:]))
    return out.index_copy(0, first_index, first).index_copy(0, second_index, second)
