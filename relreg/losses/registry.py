"""Relevance losses by name, for configs (``model.relevance_loss: robustvit``): a small registry.

Example:
    >>> from relreg.losses import create_relevance_loss, list_relevance_losses
    >>> list_relevance_losses()
    ['robustvit', 'mass', 'rrr']
    >>> create_relevance_loss("robustvit", lambda_bg=1.0)
    RobustViTLoss(lambda_bg=1.0, lambda_fg=0.3)
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from relreg.losses.modules import RelevanceMassLoss, RobustViTLoss, RRRLoss

__all__ = [
    "RELEVANCE_LOSSES",
    "create_relevance_loss",
    "list_relevance_losses",
    "register_relevance_loss",
]

RELEVANCE_LOSSES: dict[str, type[nn.Module]] = {}


def register_relevance_loss(
    name: str, cls: type[nn.Module], overwrite: bool = False
) -> type[nn.Module]:
    """Make a relevance-loss class available by ``name``; returns ``cls``.

    ``cls`` follows the contract of :mod:`relreg.losses.modules`: class attributes ``method`` (the
    explainer whose maps it shapes) and ``normalize``, and ``forward(relevance, masks, has_mask)``
    returning ``{"loss", "loss_bg", "loss_fg"}``.

    Raises:
        ValueError: ``name`` is taken and ``overwrite`` is False.
        TypeError: ``cls`` is not an ``nn.Module`` subclass.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"Expected an nn.Module subclass, but got {cls!r}.")
    if name in RELEVANCE_LOSSES and not overwrite:
        raise ValueError(f"Relevance loss {name!r} is already registered; pass overwrite=True.")
    RELEVANCE_LOSSES[name] = cls
    return cls


def list_relevance_losses() -> list[str]:
    """The registered names, in registration order."""
    return list(RELEVANCE_LOSSES)


def create_relevance_loss(name: str, **kwargs: Any) -> nn.Module:
    """A relevance loss by name (``robustvit``, ``mass``, ``rrr`` or a registered one)."""
    if name not in RELEVANCE_LOSSES:
        raise ValueError(
            f"Unknown relevance loss {name!r}; expected one of: {', '.join(RELEVANCE_LOSSES)}."
        )
    cls = RELEVANCE_LOSSES[name]
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"Expected options of relevance loss {name!r} among {accepted}, but got {unknown}."
        )
    return cls(**kwargs)


register_relevance_loss("robustvit", RobustViTLoss)
register_relevance_loss("mass", RelevanceMassLoss)
register_relevance_loss("rrr", RRRLoss)
