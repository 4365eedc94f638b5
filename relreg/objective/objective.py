"""The training objective: a weighted sum of registered terms, built from a config list.

.. code-block:: yaml

    model:
      objective:
        - {term: robustvit, weight: 0.8, options: {lambda_bg: 2.0, lambda_fg: 0.3}}
        - {term: classification, weight: 0.2, options: {target: self, temperature: 1.0}}
        - {term: counterfactual, weight: 1.0}

RobustViT's objective (Chefer, Schwartz & Wolf, NeurIPS 2022) is the first two lines, with the
paper's weights 0.8 and 0.2: :data:`ROBUSTVIT`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from relreg.objective.context import StepContext
from relreg.objective.term import TERMS, Term

__all__ = ["ROBUSTVIT", "Objective", "StepOutput", "TermSpec"]

ROBUSTVIT: tuple[dict[str, Any], ...] = (
    {"term": "robustvit", "weight": 0.8},
    {"term": "classification", "weight": 0.2, "options": {"target": "self"}},
)
_SPEC_KEYS = ("term", "weight", "options")


@dataclass(frozen=True)
class TermSpec:
    """One line of an objective config: a registered term, its weight and its options."""

    term: str
    weight: float = 1.0
    options: Mapping[str, Any] | None = None

    @classmethod
    def parse(cls, index: int, item: Mapping[str, Any] | TermSpec) -> TermSpec:
        """Check one config entry (``objective[index]``) and return it as a spec."""
        if isinstance(item, TermSpec):
            return item
        if not isinstance(item, Mapping):
            raise TypeError(
                f"Expected objective[{index}] a mapping with keys {_SPEC_KEYS}, but got "
                f"{type(item).__name__}."
            )
        unknown = sorted(set(item) - set(_SPEC_KEYS))
        if unknown or "term" not in item:
            raise ValueError(
                f"Expected objective[{index}] to have a 'term' and keys among {_SPEC_KEYS}, but "
                f"got keys {sorted(item)}."
            )
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ValueError(
                f"Expected objective[{index}].weight a number >= 0, but got {weight!r}."
            )
        return cls(item["term"], float(weight), dict(item.get("options") or {}))


@dataclass
class StepOutput:
    """What one step of :class:`relreg.lightning.RelRegModule` computed.

    Attributes:
        logits: ``(B, K)`` the batch's logits.
        loss: the weighted sum of the terms that ran (a scalar in the graph).
        terms: every term's parts by log name (``loss_cls``, ``loss_bg``, ...), scalars.
        maps: ``(M, gh, gw)`` or ``(M, H, W)`` raw maps of the masked samples, or None.
        masked: ``(M,)`` the masked samples' indices in the batch (the order of ``maps``).
    """

    logits: Tensor
    loss: Tensor
    terms: dict[str, Tensor]
    maps: Tensor | None
    masked: Tensor


class Objective(nn.Module):
    """Weighted, registered terms; see the module docstring for the config form.

    Args:
        specs: the terms, in the order their graphs are built and summed.
        model: the model being trained, for terms that keep a copy (a teacher).

    Raises:
        ValueError / TypeError: an entry is malformed, names an unknown term or gives a term
            options it does not take (before anything is built).
    """

    def __init__(
        self, specs: Sequence[Mapping[str, Any] | TermSpec], model: nn.Module | None = None
    ) -> None:
        super().__init__()
        if isinstance(specs, str | Mapping) or not isinstance(specs, Sequence):
            raise TypeError(f"Expected objective a list of terms, but got {type(specs).__name__}.")
        parsed = [TermSpec.parse(i, item) for i, item in enumerate(specs)]
        for i, spec in enumerate(parsed):
            _check_options(i, spec)
        names = [spec.term for spec in parsed]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"Expected each objective term once, but got {repeated} twice.")
        self.specs = parsed
        self.weights = [spec.weight for spec in parsed]
        self.terms = nn.ModuleList(_build(spec, model) for spec in parsed)

    @property
    def needs_maps(self) -> bool:
        """Whether a training step runs the explainer."""
        return any(term.needs_maps for term in self.terms)

    def relevance_term(self) -> Term | None:
        """The first term with a preferred explainer (``method``), or None."""
        return next((t for t in self.terms if hasattr(t, "method")), None)

    def forward(self, ctx: StepContext) -> StepOutput:
        """Run the step's terms in order; returns their parts, the weighted total and the maps.

        A term with ``in_validation=False`` runs in training steps only; a term that does not
        apply to this step (no maps, too few masked samples) gives zeros.
        """
        parts: dict[str, Tensor] = {}
        skipped: list[str] = []
        total: Tensor | None = None
        for term, weight in zip(self.terms, self.weights, strict=True):
            if not (ctx.training or term.in_validation):
                continue
            if not term.applies(ctx):
                skipped.extend(term.parts)
                continue
            values = term(ctx)
            parts.update(values)
            weighted = weight * values[term.key]
            total = weighted if total is None else total + weighted
        # the logits last: a term's first access builds their graph in the terms' order
        logits = ctx.logits
        zero = logits.new_zeros(())
        parts = {**dict.fromkeys(skipped, zero), **parts}
        maps = ctx.maps if ctx.maps_on else None
        return StepOutput(logits, zero if total is None else total, parts, maps, ctx.masked)

    def extra_repr(self) -> str:
        return ", ".join(f"{s.term}: {s.weight:g}" for s in self.specs)


def _accepted(cls: type[Term]) -> list[str]:
    return [p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs", "model")]


def _check_options(index: int, spec: TermSpec) -> None:
    cls = TERMS.get(spec.term)
    accepted = _accepted(cls)
    unknown = sorted(set(spec.options or {}) - set(accepted))
    if unknown:
        raise ValueError(
            f"Expected options of objective term {spec.term!r} among {accepted}, but got "
            f"{unknown} in objective[{index}]."
        )


def _build(spec: TermSpec, model: nn.Module | None) -> Term:
    cls = TERMS.get(spec.term)
    options = dict(spec.options or {})
    if "model" in inspect.signature(cls).parameters:
        options["model"] = model
    return cls(**options)
