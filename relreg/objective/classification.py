"""The classification term: cross-entropy to the model's own top-1 (RobustViT, Chefer, Schwartz &
Wolf, NeurIPS 2022), to the labels, or KL to a frozen teacher; see
:func:`relreg.losses.classification_loss`."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from relreg.losses import ClassificationLoss
from relreg.objective.context import StepContext
from relreg.objective.term import Term, register_term

__all__ = ["ClassificationTerm"]


@register_term("classification")
class ClassificationTerm(Term):
    """``loss_cls``: the classification term on the logits of the whole batch.

    Args:
        target: ``"self"`` (RobustViT: the model's own top-1), ``"label"`` or ``"teacher"`` (KL to
            a frozen copy of the model as it is when the objective is built).
        temperature: of the term (RobustViT: 1; DeiT-B 0.65, DeiT-S 0.55).
        model: the model being trained; needed for ``target="teacher"`` only (the objective
            passes it).
    """

    key = "loss_cls"
    needs = frozenset({"logits", "labels", "images"})

    def __init__(
        self, target: str = "self", temperature: float = 1.0, model: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.loss = ClassificationLoss(target, temperature)
        self.teacher: nn.Module | None = None
        if target == "teacher":
            if model is None:
                raise ValueError("Expected the model to copy for target='teacher', but got None.")
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> ClassificationTerm:
        """Train mode for the term; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        logits = ctx.logits
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(ctx.images)
        return {self.key: self.loss(logits, ctx.labels, teacher_logits)}
