"""relreg: train Vision Transformers that are right for the right reasons.

Batched, differentiable relevance maps for any timm ViT (:mod:`relreg.explain`: ``from
relreg.explain import explain``) and relevance-regularised fine-tuning after RobustViT (Chefer,
Schwartz & Wolf, NeurIPS 2022).

``relreg.explain`` is the subpackage (it is not shadowed by its ``explain`` function, so
``import relreg.explain as E`` and ``relreg.explain.list_explainers()`` work).
"""

from relreg import explain
from relreg.explain import create_explainer, list_explainers, to_pixels

__version__ = "0.1.0"

__all__ = ["__version__", "create_explainer", "explain", "list_explainers", "to_pixels"]
