"""Standalone, batched, differentiable explainers for timm ViTs and transformers ViT / DeiT / BEiT.

>>> from relreg.explain import explain, create_explainer, list_explainers, to_pixels
"""

from relreg.explain import (  # noqa: F401  (registers them)
    attention,
    attnlrp,
    gradient,
    lime,
    lrp,
    occlusion,
)
from relreg.explain._contract import Explanation
from relreg.explain.attnlrp_rules import AttnLRPRules
from relreg.explain.capture import AttentionCapture, find_attention_modules
from relreg.explain.engine import EngineChoice, select_engine
from relreg.explain.huggingface import HuggingFaceClassifier, HuggingFaceViT, as_explainable
from relreg.explain.registry import (
    EXPLAINERS,
    Explainer,
    ExplainerInfo,
    create_explainer,
    explain,
    explain_with_logits,
    explainer_info,
    list_explainers,
    register_explainer,
)
from relreg.explain.tokens import min_max, num_prefix_tokens, patch_grid, sum_to_patches, to_pixels

__all__ = [
    "EXPLAINERS",
    "AttentionCapture",
    "AttnLRPRules",
    "EngineChoice",
    "Explainer",
    "ExplainerInfo",
    "Explanation",
    "HuggingFaceClassifier",
    "HuggingFaceViT",
    "as_explainable",
    "create_explainer",
    "explain",
    "explain_with_logits",
    "explainer_info",
    "find_attention_modules",
    "list_explainers",
    "min_max",
    "num_prefix_tokens",
    "patch_grid",
    "register_explainer",
    "select_engine",
    "sum_to_patches",
    "to_pixels",
]
