"""``nn.Module`` twins of :mod:`relreg.losses.functional`.

A relevance loss's ``forward`` takes ``(relevance (B, H, W), masks (B, H, W), has_mask (B,) or
None)`` and returns ``{"loss", "loss_bg", "loss_fg"}``. Configs name them as terms of the
objective (:mod:`relreg.objective.relevance`), which also say which explainer's maps each loss
shapes and whether those maps are min-max normalised first.
"""

from __future__ import annotations

from torch import Tensor, nn

from relreg.losses.functional import (
    CLASSIFICATION_MODES,
    cft_loss,
    classification_loss,
    relevance_mass_loss,
    robustvit_loss,
    rrr_loss,
)
from relreg.validate import check_choice

__all__ = [
    "CFTLoss",
    "ClassificationLoss",
    "RRRLoss",
    "RelevanceMassLoss",
    "RobustViTLoss",
]


class RobustViTLoss(nn.Module):
    """RobustViT's relevance loss (NeurIPS 2022); see :func:`relreg.losses.robustvit_loss`.

    Args:
        lambda_bg: background weight (paper: 2).
        lambda_fg: foreground weight (paper: 0.3).
    """

    def __init__(self, lambda_bg: float = 2.0, lambda_fg: float = 0.3) -> None:
        super().__init__()
        self.lambda_bg = lambda_bg
        self.lambda_fg = lambda_fg

    def forward(
        self, relevance: Tensor, masks: Tensor, has_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``relevance``, ``masks``: ``(B, H, W)``; ``has_mask``: ``(B,)`` bool or None."""
        return robustvit_loss(relevance, masks, self.lambda_bg, self.lambda_fg, has_mask)

    def extra_repr(self) -> str:
        return f"lambda_bg={self.lambda_bg}, lambda_fg={self.lambda_fg}"


class CFTLoss(nn.Module):
    """CFT's alignment loss (CVPR 2026); see :func:`relreg.losses.cft_loss`.

    Args:
        lambda_ctx: weight of the context (outside the mask) term (CFT: 1.2).
        lambda_concept: weight of the concept (inside the mask) term (CFT: 0.5).
    """

    def __init__(self, lambda_ctx: float = 1.2, lambda_concept: float = 0.5) -> None:
        super().__init__()
        self.lambda_ctx = lambda_ctx
        self.lambda_concept = lambda_concept

    def forward(
        self, relevance: Tensor, masks: Tensor, has_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``relevance``, ``masks``: ``(B, H, W)``; ``has_mask``: ``(B,)`` bool or None."""
        return cft_loss(relevance, masks, self.lambda_ctx, self.lambda_concept, has_mask)

    def extra_repr(self) -> str:
        return f"lambda_ctx={self.lambda_ctx}, lambda_concept={self.lambda_concept}"


class RelevanceMassLoss(nn.Module):
    """Energy / relevance-mass loss: fraction of relevance outside the mask."""

    def forward(
        self, relevance: Tensor, masks: Tensor, has_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``relevance``, ``masks``: ``(B, H, W)``; ``has_mask``: ``(B,)`` bool or None."""
        return relevance_mass_loss(relevance, masks, has_mask)


class RRRLoss(nn.Module):
    """Right for the Right Reasons (Ross et al., IJCAI 2017).

    The squared input gradient outside the mask; see :func:`relreg.losses.rrr_loss`.
    """

    def forward(
        self, relevance: Tensor, masks: Tensor, has_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``relevance``: raw ``(B, H, W)`` input-gradient map; ``masks``: ``(B, H, W)``."""
        return rrr_loss(relevance, masks, has_mask)


class ClassificationLoss(nn.Module):
    """Classification term: ``self`` (RobustViT), ``label`` or ``teacher``; see
    :func:`relreg.losses.classification_loss`."""

    def __init__(self, mode: str = "self", temperature: float = 1.0) -> None:
        super().__init__()
        check_choice("mode", mode, CLASSIFICATION_MODES)
        self.mode = mode
        self.temperature = temperature

    def forward(
        self, logits: Tensor, labels: Tensor | None = None, teacher_logits: Tensor | None = None
    ) -> Tensor:
        """``logits``: ``(B, K)``; ``labels``: ``(B,)``; ``teacher_logits``: ``(B, K)``."""
        return classification_loss(logits, self.mode, labels, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, temperature={self.temperature}"
