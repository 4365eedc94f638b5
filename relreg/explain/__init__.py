"""Standalone, batched, differentiable explainers for timm ViTs.

>>> from relreg.explain import explain, create_explainer, list_explainers, to_pixels
"""

from relreg.explain import attention, gradient  # noqa: F401  (registers the explainers)
from relreg.explain.attention import chefer, gradcam, raw_attention, rollout
from relreg.explain.capture import AttentionCapture, find_attention_modules
from relreg.explain.gradient import input_x_gradient, integrated_gradients, saliency, smoothgrad
from relreg.explain.registry import (
    Explainer,
    ExplainerInfo,
    create_explainer,
    explain,
    explainer_info,
    list_explainers,
    register_explainer,
)
from relreg.explain.tokens import min_max, num_prefix_tokens, patch_grid, to_pixels

__all__ = [
    "AttentionCapture",
    "Explainer",
    "ExplainerInfo",
    "chefer",
    "create_explainer",
    "explain",
    "explainer_info",
    "find_attention_modules",
    "gradcam",
    "input_x_gradient",
    "integrated_gradients",
    "list_explainers",
    "min_max",
    "num_prefix_tokens",
    "patch_grid",
    "raw_attention",
    "register_explainer",
    "rollout",
    "saliency",
    "smoothgrad",
    "to_pixels",
]
