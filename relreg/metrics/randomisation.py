"""Randomisation metrics as torchmetrics ``Metric``s: does the map depend on what it explains?

- :class:`RandomLogit`: Sixt, Granz & Landgraf, ICML 2020: SSIM between each map and the map of a
  random other class (lower is better). The math, the conventions against Quantus and the
  functional twin :func:`relreg.metrics.random_logit` are in
  :mod:`relreg.metrics.functional.randomisation`. The states are sums, so DDP results are exact,
  and each sample's class is drawn from its own generator, so they do not depend on the batching.

The model-randomisation check (Adebayo et al. 2018) is :func:`relreg.metrics.model_randomisation`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from relreg.explain import explainer_info
from relreg.metrics.functional.randomisation import TARGET_MODES, _random_logit_update
from relreg.validate import check_choice

__all__ = ["RandomLogit"]


class RandomLogit(Metric):
    """Random-logit SSIM (Sixt et al., ICML 2020), averaged over images: lower is better.

    Each image is explained again (by ``method``) for a random class other than the one its map
    explains; the score is the SSIM of the two maps (1: the map ignores the class).

    Args:
        model: the classifier.
        method: the explainer that made the maps passed to ``update``.
        target_mode: which class those maps explain: ``"predicted"`` (top-1) or ``"label"``.
        seed: the draws' seed (per sample: :func:`relreg.metrics.sample_seeds`).
        explain_options: keyword options of ``method``.
        **kwargs: torchmetrics ``Metric`` options.

    Example:
        >>> import timm, torch
        >>> from relreg.explain import explain
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> metric = RandomLogit(model, method="rollout")
        >>> metric.update(x, explain(model, x, "rollout"))
        >>> metric.compute()  # rollout ignores the class
        tensor(1.)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        model: nn.Module,
        method: str = "chefer",
        target_mode: str = "predicted",
        seed: int = 0,
        explain_options: Mapping[str, object] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected model a torch.nn.Module, but got {type(model).__name__}.")
        explainer_info(method)  # a ValueError naming the registered explainers
        check_choice("target_mode", target_mode, TARGET_MODES)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected seed an int, but got {seed!r}.")
        object.__setattr__(self, "_model", model)  # not a submodule: no weights in state_dict
        self.method, self.target_mode, self.seed = method, target_mode, seed
        self.explain_options = dict(explain_options or {})
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
        """Add a batch; ``indices`` ``(B,)``: dataset indices to key each sample's draw on."""
        scores = _random_logit_update(
            self._model,
            images,
            maps,
            target,
            self.method,
            self.target_mode,
            self.seed,
            indices,
            self.explain_options,
        )
        scores = scores[torch.isfinite(scores)]
        self.total += scores.sum()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        """The mean (NaN before any scored pair)."""
        if not int(self.count):
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()
