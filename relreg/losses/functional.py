"""Losses on relevance maps and the classification terms of relevance-regularised fine-tuning.

- :func:`robustvit_loss`: RobustViT (Chefer, Schwartz & Wolf, "Optimizing Relevance Maps of Vision
  Transformers Improves Robustness", NeurIPS 2022): ``L_bg = MSE(R * (1 - S), 0)``,
  ``L_fg = MSE(R * S, S)``, ``L = lambda_bg * L_bg + lambda_fg * L_fg`` on per-image min-max
  normalised pixel relevance ``R`` and a binary foreground mask ``S``.
- :func:`cft_loss`: Concept-Guided Fine-Tuning (Elisha, Barkan & Koenigstein, "Concept-Guided
  Fine-Tuning: Steering ViTs away from Spurious Correlations to Improve Robustness", CVPR 2026):
  RobustViT's two terms with binary cross-entropy instead of the squared error,
  ``L_ctx = BCE(R * (1 - S), 0)``, ``L_concept = BCE(R * S, S)``,
  ``L = lambda_ctx * L_ctx + lambda_concept * L_concept`` (``scripts/train.py`` of yonisGit/cft).
- :func:`relevance_mass_loss`: the energy / relevance-mass loss, the fraction of (non-negative)
  relevance outside the mask.
- :func:`rrr_loss`: "Right for the Right Reasons" (Ross, Hughes & Doshi-Velez, IJCAI 2017): the
  squared input gradient outside the mask (compute the gradient map with ``create_graph=True``,
  e.g. ``explain(..., method="saliency", differentiable=True)``). relreg's map is the explained
  logit's gradient, max over channels, where the paper sums log-probabilities and channels.
- :func:`classification_loss`: ``self`` (RobustViT: cross-entropy to the model's own top-1 with
  temperature T), ``label`` (ground truth) or ``teacher`` (KL to a frozen model's predictions).

All relevance losses share one interface: ``(relevance (B, H, W), masks (B, H, W), has_mask (B,)
or None) -> {"loss", "loss_bg", "loss_fg"}`` (scalar tensors). Samples without a mask contribute
nothing; a batch without any mask gives zeros that still belong to the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from relreg.validate import check_choice

__all__ = [
    "robustvit_loss",
    "cft_loss",
    "relevance_mass_loss",
    "rrr_loss",
    "classification_loss",
    "CLASSIFICATION_MODES",
]

CLASSIFICATION_MODES = ("self", "label", "teacher")


def _check(relevance: Tensor, masks: Tensor, has_mask: Tensor | None) -> Tensor:
    """Validate the shared inputs; returns ``has_mask`` as a ``(B,)`` bool tensor."""
    for name, t in (("relevance", relevance), ("masks", masks)):
        if not isinstance(t, Tensor):
            raise TypeError(f"Expected {name} to be a torch.Tensor, but got {type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(f"Expected {name} of a floating dtype, but got {t.dtype}.")
    if relevance.ndim != 3:
        raise ValueError(
            f"Expected relevance of shape (B, H, W), but got shape {tuple(relevance.shape)}."
        )
    if masks.shape != relevance.shape:
        raise ValueError(
            f"Expected masks of the relevance's shape {tuple(relevance.shape)}, "
            f"but got {tuple(masks.shape)}; "
            "resize masks to the image with nearest-neighbour interpolation first."
        )
    if not torch.isfinite(relevance).all():
        raise ValueError("Expected finite relevance, but got NaN or Inf values.")
    if not ((masks >= 0) & (masks <= 1)).all():  # written so that NaN fails too
        raise ValueError(
            "Expected mask values in [0, 1], "
            f"but got values in [{masks.min().item():g}, {masks.max().item():g}]; "
            "divide 0/255 masks by 255."
        )
    b = relevance.shape[0]
    if has_mask is None:
        return torch.ones(b, dtype=torch.bool, device=relevance.device)
    if not isinstance(has_mask, Tensor) or has_mask.dtype != torch.bool or has_mask.shape != (b,):
        got = (
            f"{has_mask.dtype} {tuple(has_mask.shape)}"
            if isinstance(has_mask, Tensor)
            else type(has_mask).__name__
        )
        raise ValueError(f"Expected has_mask a bool tensor of shape ({b},), but got {got}.")
    return has_mask


def _masked_mean(per_pixel: Tensor, has_mask: Tensor) -> Tensor:
    """Mean over the pixels of the samples that have a mask; 0 (in the graph) when none has."""
    weight = has_mask.to(per_pixel.dtype).view(-1, *([1] * (per_pixel.ndim - 1)))
    count = has_mask.sum() * per_pixel[0].numel()
    return (per_pixel * weight).sum() / count.clamp_min(1)


def robustvit_loss(
    relevance: Tensor,
    masks: Tensor,
    lambda_bg: float = 2.0,
    lambda_fg: float = 0.3,
    has_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """The RobustViT relevance loss.

    Args:
        relevance: ``(B, H, W)`` per-image min-max normalised pixel relevance (``to_pixels``).
        masks: ``(B, H, W)`` foreground masks with values in [0, 1] (binary in the paper).
        lambda_bg: weight of the background term (paper: 2).
        lambda_fg: weight of the foreground term (paper: 0.3).
        has_mask: ``(B,)`` bool, which samples have a mask (default: all).

    Returns:
        ``{"loss", "loss_bg", "loss_fg"}`` scalar tensors; means over the masked samples' pixels.

    Example:
        >>> import torch
        >>> r = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
        >>> s = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
        >>> {k: round(v.item(), 4) for k, v in robustvit_loss(r, s).items()}
        {'loss': 0.125, 'loss_bg': 0.0625, 'loss_fg': 0.0}
    """
    has = _check(relevance, masks, has_mask)
    loss_bg = _masked_mean((relevance * (1 - masks)) ** 2, has)
    loss_fg = _masked_mean((relevance * masks - masks) ** 2, has)
    return {
        "loss": lambda_bg * loss_bg + lambda_fg * loss_fg,
        "loss_bg": loss_bg,
        "loss_fg": loss_fg,
    }


def relevance_mass_loss(
    relevance: Tensor, masks: Tensor, has_mask: Tensor | None = None, eps: float = 1e-8
) -> dict[str, Tensor]:
    """Fraction of the (non-negative) relevance outside the mask, averaged over masked samples.

    ``loss_bg`` is that fraction, ``loss_fg`` is 0 (the loss has no separate foreground term).
    """
    has = _check(relevance, masks, has_mask)
    if (relevance < 0).any():
        raise ValueError(
            "Expected non-negative relevance for the relevance-mass loss; normalise it first."
        )
    outside = (relevance * (1 - masks)).flatten(1).sum(1) / relevance.flatten(1).sum(1).clamp_min(
        eps
    )
    loss_bg = _masked_mean(outside, has)
    return {"loss": loss_bg, "loss_bg": loss_bg, "loss_fg": torch.zeros_like(loss_bg)}


def cft_loss(
    relevance: Tensor,
    masks: Tensor,
    lambda_ctx: float = 1.2,
    lambda_concept: float = 0.5,
    has_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """CFT's alignment loss: binary cross-entropy of the relevance outside and inside the mask.

    As ``_compute_forward_and_losses`` in ``scripts/train.py`` of yonisGit/cft (commit
    accaf56): ``contex_loss = BCE(R * (1 - S), 0)``, ``concept_loss = BCE(R * S, S)`` (torch's
    ``BCELoss``, mean over pixels, the log clamped at -100), weighted ``lambda_ctx`` and
    ``lambda_concept`` (its README's and defaults: 1.2 and 0.5). CFT weights the sum by
    ``lambda_align = 0.8`` against ``lambda_acc = 0.2`` for the classification: those are the
    objective's term weights.

    Args:
        relevance: ``(B, H, W)`` per-image min-max normalised pixel relevance, in [0, 1].
        masks: ``(B, H, W)`` concept (foreground) masks with values in [0, 1].
        lambda_ctx: weight of the context (outside the mask) term.
        lambda_concept: weight of the concept (inside the mask) term.
        has_mask: ``(B,)`` bool, which samples have a mask (default: all).

    Returns:
        ``{"loss", "loss_bg", "loss_fg"}`` scalar tensors (``loss_bg`` the context term,
        ``loss_fg`` the concept term); means over the masked samples' pixels.

    Raises:
        ValueError: for relevance outside [0, 1] (normalise it first: ``to_pixels``).

    Example:
        >>> import torch
        >>> r = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
        >>> s = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
        >>> {k: round(v.item(), 4) for k, v in cft_loss(r, s).items()}
        {'loss': 0.2079, 'loss_bg': 0.1733, 'loss_fg': 0.0}
    """
    has = _check(relevance, masks, has_mask)
    if not ((relevance >= 0) & (relevance <= 1)).all():
        raise ValueError(
            "Expected relevance in [0, 1] for the binary cross-entropy, but got values in "
            f"[{relevance.min().item():g}, {relevance.max().item():g}]; min-max normalise the "
            "maps first (to_pixels(..., normalize=True))."
        )
    ctx = F.binary_cross_entropy(relevance * (1 - masks), torch.zeros_like(masks), reduction="none")
    concept = F.binary_cross_entropy(relevance * masks, masks, reduction="none")
    loss_bg, loss_fg = _masked_mean(ctx, has), _masked_mean(concept, has)
    return {
        "loss": lambda_ctx * loss_bg + lambda_concept * loss_fg,
        "loss_bg": loss_bg,
        "loss_fg": loss_fg,
    }


def rrr_loss(relevance: Tensor, masks: Tensor, has_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Right for the Right Reasons: mean squared input gradient outside the mask.

    ``relevance`` is a raw (not normalised) input-gradient map computed with ``create_graph=True``.
    """
    has = _check(relevance, masks, has_mask)
    loss_bg = _masked_mean((relevance * (1 - masks)) ** 2, has)
    return {"loss": loss_bg, "loss_bg": loss_bg, "loss_fg": torch.zeros_like(loss_bg)}


def classification_loss(
    logits: Tensor,
    mode: str = "self",
    labels: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Classification term of the fine-tuning loss.

    Args:
        logits: ``(B, K)`` the model's logits.
        mode: ``"self"``: ``CE(logits / T, argmax(logits))`` (RobustViT); ``"label"``:
            ``CE(logits, labels)``; ``"teacher"``:
            ``T^2 * KL(softmax(t / T) || softmax(logits / T))``.
        labels: ``(B,)`` ground truth, for ``"label"``.
        teacher_logits: ``(B, K)`` a frozen model's logits, for ``"teacher"``.
        temperature: T > 0 (RobustViT: 1; 0.65 for DeiT-B, 0.55 for DeiT-S).

    Returns:
        A scalar tensor.
    """
    check_choice("mode", mode, CLASSIFICATION_MODES)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"Expected logits of shape (B, K), but got {got}.")
    if not temperature > 0:
        raise ValueError(f"Expected temperature > 0, but got {temperature!r}.")
    if mode == "self":
        return F.cross_entropy(logits / temperature, logits.detach().argmax(dim=1))
    if mode == "label":
        if labels is None or labels.shape != logits.shape[:1]:
            got = None if labels is None else tuple(labels.shape)
            raise ValueError(
                f"Expected labels of shape ({logits.shape[0]},) for mode 'label', but got {got}."
            )
        return F.cross_entropy(logits, labels)
    if teacher_logits is None or teacher_logits.shape != logits.shape:
        got = None if teacher_logits is None else tuple(teacher_logits.shape)
        raise ValueError(
            f"Expected teacher_logits of shape {tuple(logits.shape)} for mode 'teacher', "
            f"but got {got}."
        )
    target = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return (
        F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="batchmean")
        * temperature**2
    )
