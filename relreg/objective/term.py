"""The base class of a training-objective term, and the registry of terms by name.

A term is a small ``nn.Module`` (so that state of its own, a frozen teacher or a buffer, is saved
in checkpoints and moved with the model) that declares what it needs from the training step and
returns its loss and the parts worth logging. :class:`relreg.objective.Objective` weighs and sums
the terms; :class:`relreg.objective.StepContext` computes what they need, once per step.

Example (a term that keeps the logits small):
    >>> from torch import Tensor
    >>> from relreg.objective import Term, register_term
    >>> @register_term("logit_norm")
    ... class LogitNorm(Term):
    ...     key = "loss_logit_norm"
    ...     needs = frozenset({"logits"})
    ...     def forward(self, ctx) -> dict[str, Tensor]:
    ...         return {self.key: ctx.logits.pow(2).mean()}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from relreg.registry import Registry

if TYPE_CHECKING:
    from relreg.objective.context import StepContext

__all__ = ["NEEDS", "TERMS", "Term", "list_terms", "register_term"]

# what a term may ask the step for (StepContext's attributes of the same names)
NEEDS = frozenset(
    {
        "images",  # (B, C, H, W) the batch
        "labels",  # (B,) classes
        "groups",  # (B,) the samples' groups (datasets with a ``group``: Waterbirds, ...)
        "logits",  # (B, K) the model's logits of the batch (the explained pass for masked samples)
        "masked",  # (M,) indices of the samples that have a mask
        "masks",  # (M, H, W) their masks
        "maps",  # (M, gh, gw) or (M, H, W) the explainer's raw maps of their labels
        "pixels",  # (M, H, W) those maps at the masks' resolution (min-max normalised or raw)
        "masked_logits",  # (M, K) the logits of the masked samples
        "swapped_logits",  # (M, K) logits of the masked samples with backgrounds swapped
        "model",  # the classifier, for terms that run more forward passes
    }
)
MAP_NEEDS = frozenset({"maps", "pixels"})


class Term(nn.Module):
    """One term of the training objective.

    Subclasses set the class attributes and implement :meth:`forward`.

    Attributes:
        key: the log name of the term's loss (``"loss_cls"``: logged as ``train/loss_cls``).
        needs: what :meth:`forward` reads from the step context (names in :data:`NEEDS`).
        in_validation: whether the term is part of ``val/loss`` and ``test/loss`` (terms that
            cost extra forward passes, or only make sense while training, say False).
        min_masked: how many masked samples the term needs in a batch; with fewer (or with the
            maps off on this step, for terms that need maps) its parts are zeros.
    """

    key: ClassVar[str] = "loss_term"
    needs: ClassVar[frozenset[str]] = frozenset()
    in_validation: ClassVar[bool] = True
    min_masked: ClassVar[int] = 0

    @property
    def needs_maps(self) -> bool:
        """Whether the term reads relevance maps (the step then runs the explainer)."""
        return bool(self.needs & MAP_NEEDS)

    @property
    def parts(self) -> tuple[str, ...]:
        """The names of the values :meth:`forward` returns; ``key`` first."""
        return (self.key,)

    def applies(self, ctx: StepContext) -> bool:
        """Whether the step has what the term needs (maps on, enough masked samples)."""
        if self.needs_maps and not ctx.maps_on:
            return False
        return ctx.num_masked >= max(self.min_masked, 1 if self.needs_maps else 0)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        """The term's loss under ``key`` and any further parts (scalar tensors)."""
        raise NotImplementedError


def _check_term(name: str, cls: type[Term]) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Term)):
        raise TypeError(f"Expected objective term {name!r} a Term subclass, but got {cls!r}.")
    unknown = sorted(set(cls.needs) - NEEDS)
    if unknown:
        raise ValueError(
            f"Expected the needs of objective term {name!r} among {sorted(NEEDS)}, but got "
            f"{unknown}."
        )


TERMS: Registry[type[Term]] = Registry("objective term", check=_check_term)


def register_term(name: str, *, overwrite: bool = False):
    """Class decorator: make a :class:`Term` subclass available to configs as ``term: name``."""
    return TERMS.register(name, overwrite=overwrite)


def list_terms() -> list[str]:
    """The registered term names, in registration order."""
    return TERMS.list()
