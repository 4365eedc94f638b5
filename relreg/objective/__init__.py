"""The training objective as registered terms (RobustViT's relevance loss, the classification
term, background counterfactuals, the faithfulness anchor, and terms of your own).

Example:
    >>> from relreg.objective import Objective, list_terms
    >>> list_terms()
    ['robustvit', 'mass', 'rrr', 'classification', 'counterfactual', 'faithfulness']
    >>> Objective([{"term": "robustvit", "weight": 0.8}, {"term": "classification", "weight": 0.2}])
    Objective(
      robustvit: 0.8, classification: 0.2
      (terms): ModuleList(
        (0): RobustViTTerm(
          method='chefer'
          (loss): RobustViTLoss(lambda_bg=2.0, lambda_fg=0.3)
        )
        (1): ClassificationTerm(
          (loss): ClassificationLoss(mode='self', temperature=1.0)
        )
      )
    )
"""

# the built-in terms register on import, in this order (list_terms() and error messages show it):
# the relevance terms first, then the others
from relreg.objective.relevance import CFTTerm, MassTerm, RelevanceTerm, RobustViTTerm, RRRTerm

# isort: split
from relreg.objective.classification import ClassificationTerm
from relreg.objective.context import ExplainerSpec, StepContext
from relreg.objective.counterfactual import CounterfactualTerm
from relreg.objective.faithfulness import FaithfulnessTerm
from relreg.objective.group_dro import GroupDROTerm
from relreg.objective.objective import ROBUSTVIT, Objective, StepOutput, TermSpec
from relreg.objective.term import NEEDS, TERMS, Term, list_terms, register_term

__all__ = [
    "NEEDS",
    "ROBUSTVIT",
    "TERMS",
    "CFTTerm",
    "ClassificationTerm",
    "GroupDROTerm",
    "CounterfactualTerm",
    "ExplainerSpec",
    "FaithfulnessTerm",
    "MassTerm",
    "Objective",
    "RRRTerm",
    "RelevanceTerm",
    "RobustViTTerm",
    "StepContext",
    "StepOutput",
    "Term",
    "TermSpec",
    "list_terms",
    "register_term",
]
