"""Complexity metrics as functions: how concentrated a relevance map is, without a model or a mask.

Each is computed per image on the map's absolute values divided by their largest one (Quantus'
defaults, ``abs=True`` and ``normalise_by_max``), at whatever resolution the map comes in: the
callback and ``relreg evaluate`` pass maps upsampled to the image, as Quantus users pass
pixel attributions, so that explainers with patch-grid and pixel maps are compared alike.

- sparseness: the Gini index of the sorted values ``a_(1) <= ... <= a_(n)``,
  ``sum_i (2 i - n - 1) a_(i) / (n sum_i a_(i))``, in [0, 1), higher is sparser (Chalasani et al.,
  "Concise Explanations of Neural Networks using Adversarial Training", ICML 2020). As in Quantus
  (``quantus/metrics/complexity/sparseness.py``) ``1e-7`` is added to every value first, so that an
  all-zero map scores 0;
- complexity: the entropy ``-sum_i p_i log(p_i + 1e-12)`` of the fractions ``p_i = a_i / sum a``,
  in [0, log n], lower is simpler (Bhatt, Weller & Moura, "Evaluating and Aggregating
  Feature-based Model Explanations", IJCAI 2020; ``quantus/metrics/complexity/complexity.py``).
  An all-zero map has no fractions: Quantus returns NaN for it, relreg leaves it out of the mean;
- effective complexity: the number of values above ``eps`` (default ``1e-5``), lower is simpler
  (Nguyen & Martínez, "On Quantitative Aspects of Model Interpretability", 2020;
  ``quantus/metrics/complexity/effective_complexity.py``). A count of pixels, as in Quantus, so
  it grows with the image size.

The per-image ``_x_update`` functions return ``(B,)`` scores (NaN for an image left out); the
``Metric`` classes (:mod:`relreg.metrics.complexity`) sum them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from relreg.validate import check_positive_float

__all__ = ["complexity", "effective_complexity", "sparseness"]


def _unit_max(maps: Tensor) -> Tensor:
    """Validate maps ``(B, ...)``; return ``|maps| / max|maps|`` per image, flat ``(B, n)`` in
    float64 (an all-zero map stays zero)."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"Expected maps to be a torch.Tensor, but got {type(maps).__name__}.")
    if maps.ndim < 2 or maps.shape[0] == 0 or maps[0].numel() < 2:
        raise ValueError(
            "Expected maps (B, h, w) with B >= 1 and at least 2 values per map, but got shape "
            f"{tuple(maps.shape)}."
        )
    if not maps.is_floating_point():
        raise TypeError(f"Expected floating-point maps, but got dtype {maps.dtype}.")
    if not torch.isfinite(maps).all():
        raise ValueError("Expected finite maps, but got NaN or Inf values.")
    a = maps.detach().flatten(1).double().abs()
    top = a.amax(dim=1, keepdim=True)
    return torch.where(top > 0, a / top.clamp_min(torch.finfo(a.dtype).tiny), a)


def _sparseness_update(maps: Tensor) -> Tensor:
    """Per-image Gini index ``(B,)`` (see the module docstring)."""
    a = (_unit_max(maps) + 1e-7).sort(dim=1).values
    n = a.shape[1]
    i = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    return ((2 * i - n - 1) * a).sum(1) / (n * a.sum(1))


def _complexity_update(maps: Tensor) -> Tensor:
    """Per-image entropy ``(B,)`` of the fractions of relevance; NaN for an all-zero map."""
    a = _unit_max(maps)
    total = a.sum(1, keepdim=True)
    p = a / total.clamp_min(torch.finfo(a.dtype).tiny)
    entropy = -(p * torch.log(p + 1e-12)).sum(1)
    return torch.where(total[:, 0] > 0, entropy, torch.full_like(entropy, float("nan")))


def _effective_complexity_update(maps: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-image count ``(B,)`` of the normalised absolute values above ``eps``."""
    check_positive_float("eps", eps)
    return (_unit_max(maps) > eps).sum(1).double()


def _mean(scores: Tensor) -> Tensor:
    kept = scores[torch.isfinite(scores)]
    return kept.mean().float() if kept.numel() else torch.tensor(float("nan"))


def sparseness(maps: Tensor) -> Tensor:
    """Mean Gini index of the maps' absolute values, in [0, 1) (higher is sparser).

    Args:
        maps: ``(B, h, w)`` (or any ``(B, ...)``) relevance maps.

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> peaked = torch.zeros(1, 4, 4)
        >>> peaked[0, 0, 0] = 1.0
        >>> sparseness(peaked) > 0.9, sparseness(torch.ones(1, 4, 4)) < 1e-6
        (tensor(True), tensor(True))
    """
    return _mean(_sparseness_update(maps))


def complexity(maps: Tensor) -> Tensor:
    """Mean entropy of the fractions of absolute relevance, in [0, log n] (lower is simpler).

    All-zero maps are left out of the mean (NaN if every map is zero).

    Args:
        maps: ``(B, h, w)`` (or any ``(B, ...)``) relevance maps, ``n`` values each.

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> round(complexity(torch.ones(2, 4, 4)).item(), 4)  # log(16)
        2.7726
    """
    return _mean(_complexity_update(maps))


def effective_complexity(maps: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean number of values whose ``|a| / max|a|`` exceeds ``eps`` (lower is simpler).

    Args:
        maps: ``(B, h, w)`` (or any ``(B, ...)``) relevance maps.
        eps: the threshold, on values divided by each map's largest absolute value.

    Returns:
        A scalar tensor (a count of values, averaged over the maps).

    Example:
        >>> import torch
        >>> effective_complexity(torch.tensor([[[0.0, 1.0], [1e-7, 0.5]]]))
        tensor(2.)
    """
    return _mean(_effective_complexity_update(maps, eps))
