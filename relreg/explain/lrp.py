"""Layer-wise relevance propagation (LRP) for timm ViTs: full, partial, transformer attribution.

On timm's ``VisionTransformer`` (DeiT included), ``Eva`` (EVA-02, RoPE-ViT, DINOv3) and ``Beit``
(BEiT, BEiT v2); :mod:`relreg.explain.lrp_models` decides which family's code runs a model.

- ``lrp``: Bach, Binder, Montavon, Klauschen, Mueller & Samek, "On Pixel-Wise Explanations for
  Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation", PLoS ONE 2015, with the
  transformer rules of Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
  Visualization", CVPR 2021: relevance of the input pixels, summed over colour channels,
  ``(B, H, W)``.
- ``partial_lrp``: Voita, Talbot, Moiseev, Sennrich & Titov, "Analyzing Multi-Head
  Self-Attention", ACL 2019, as evaluated by Chefer et al., CVPR 2021: the LRP relevance of the
  last block's attention probabilities, positive part, head mean, read-out row, ``(B, gh, gw)``.
- ``transformer_attribution``: Chefer, Gur & Wolf, CVPR 2021: per block
  ``Abar_b = mean_h (dy/dA_b * R_b)^+`` with ``R_b`` the LRP relevance of the attention
  probabilities ``A_b``; rollout ``prod_b (I + Abar_b)`` from ``start_layer``; read-out row over
  the patch tokens, ``(B, gh, gw)``.

The propagation rules are in :mod:`relreg.explain.lrp_rules`; the model checks, the functional
forward pass and the propagation through the blocks in :mod:`relreg.explain.lrp_vit` (and, for the
rotary and the relative-bias families, :mod:`relreg.explain.lrp_eva` and
:mod:`relreg.explain.lrp_beit`).

Contrast (``foil``), conservative rules: the start ``one_hot(target) - one_hot(foil)`` sums to 0,
which the normalised addition rule turns into 0 everywhere, so the target's and the foil's
relevances are propagated separately (from their one-hot starts) and subtracted;
``transformer_attribution`` weights that difference with the gradient of ``y_target - y_foil``.

``lrp`` and ``partial_lrp`` take ``rules``: ``"conservative"`` (default, the rules above) or
``"cvpr2021_baseline"``, the standard LRP layers the CVPR 2021 paper computed these two baselines
with (not conservative: see :mod:`relreg.explain.lrp_baseline`).

Every sum of a normalisation is taken per sample, so a batched call equals one call per image. What
the learned prefix tokens (CLS, distillation, registers) and the position embedding receive leaves
the network, so under the conservative rules ``lrp``'s pixel map sums to the start relevance minus
their share (1 minus it for one-hot starts); on BEiT the relative position bias's share of every
block's attention logits leaves it as well. The model is not modified: no hooks, no flags, no mode
changes. One forward pass serves the whole batch; one backward pass (to the attention maps only)
adds the gradients of ``transformer_attribution``. These maps are not differentiable
(``differentiable=True`` raises).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relreg.explain._contract import (
    Explanation,
    Target,
    TargetLike,
    check_grad_mode,
    check_images,
    check_start_layer,
    finish,
    resolve_classes,
    score,
    target_weights,
)
from relreg.explain.lrp_baseline import check_rules
from relreg.explain.lrp_baseline import propagate as baseline_propagate
from relreg.explain.lrp_baseline import start_relevance as baseline_start
from relreg.explain.lrp_models import check_lrp_model, functional_forward, propagate
from relreg.explain.lrp_vit import ViTForward
from relreg.explain.registry import register_explainer
from relreg.explain.tokens import _readout, _to_grid

__all__ = ["lrp", "partial_lrp", "transformer_attribution"]


# ------------------------------------------------------------------------ checks and contrast


def _check_flags(method: str, differentiable: bool, second_order: bool) -> None:
    if differentiable or second_order:
        raise ValueError(
            f"Explainer {method!r} is not differentiable: expected differentiable=False and "
            f"second_order=False, but got differentiable={differentiable}, "
            f"second_order={second_order}."
        )


def _check_image_size(model: nn.Module, images: Tensor) -> None:
    embed = model.patch_embed
    size = tuple(images.shape[-2:])
    ph, pw = embed.patch_size
    if embed.strict_img_size and embed.img_size is not None and size != tuple(embed.img_size):
        raise ValueError(
            f"Expected images of size {tuple(embed.img_size)} for this model, but got {size}."
        )
    if not embed.dynamic_img_pad and (size[0] % ph or size[1] % pw):
        raise ValueError(
            f"Expected image height and width divisible by the patch size {(ph, pw)}, "
            f"but got {size}."
        )


def start_relevance(logits: Tensor, classes: Tensor) -> Tensor:
    """The LRP start: ``one_hot(classes)`` ``(B, K)`` in the logits' dtype."""
    return F.one_hot(classes, logits.shape[1]).to(logits.dtype)


def contrast_propagate(
    model: nn.Module,
    fwd: ViTForward,
    target: Tensor,
    foil: Tensor | None,
    down_to: int = 0,
    pixels: bool = False,
) -> tuple[dict[int, Tensor], Tensor | None]:
    """:func:`propagate` from ``one_hot(target)``; with a foil, the target's relevances minus the
    foil's (each propagated from its own one-hot start). Weights ``w`` ``(B, K)`` (and a target
    function, through its gradient at the logits) start from ``w+`` and ``w-`` apart, the same way.

    The contrast start ``one_hot(target) - one_hot(foil)`` sums to 0, and the normalised addition
    rule rescales each part to a share of that total: it would give 0 everywhere. LRP without the
    normalisation is linear in the start relevance, so the difference of the two propagations is
    the contrast's relevance under the same rules.
    """
    if isinstance(target, Tensor) and not target.is_floating_point():
        starts = [start_relevance(fwd.logits, target)]
        starts += [] if foil is None else [start_relevance(fwd.logits, foil)]
    else:  # weights or a function: its positive and negative parts, each propagated on its own
        w = target_weights(target, fwd.logits.detach())
        starts = [w.clamp(min=0), (-w).clamp(min=0)]
    attention, pix = propagate(model, fwd, starts[0], down_to, pixels)
    for start in starts[1:]:
        if not start.any():
            continue
        attention_f, pix_f = propagate(model, fwd, start, down_to, pixels)
        attention = {i: r - attention_f[i] for i, r in attention.items()}
        pix = None if pix is None or pix_f is None else pix - pix_f
    return attention, pix


def _relevances(
    model: nn.Module,
    fwd: ViTForward,
    target: Target,
    foil: Tensor | None,
    down_to: int,
    pixels: bool,
    rules: str,
) -> tuple[dict[int, Tensor], Tensor | None]:
    """:func:`contrast_propagate` under the conservative rules; under the CVPR 2021 baseline rules
    (linear in the start) one pass from :func:`relreg.explain.lrp_baseline.start_relevance`."""
    if rules == "conservative":
        return contrast_propagate(model, fwd, target, foil, down_to, pixels)
    start = baseline_start(fwd.logits, target, foil)
    return baseline_propagate(model, fwd, start, down_to, pixels)


# ----------------------------------------------------------------------------------- explainers


def _prepare(
    model: nn.Module,
    images: Tensor,
    method: str,
    differentiable: bool,
    second_order: bool,
    rules: str = "conservative",
) -> None:
    _check_flags(method, differentiable, second_order)
    check_rules(rules)
    check_images(model, images)
    check_lrp_model(model, rules)
    _check_image_size(model, images)


@register_explainer(
    "transformer_attribution",
    output="grid",
    paper=(
        "Chefer, Gur & Wolf, Transformer Interpretability Beyond Attention Visualization, CVPR 2021"
    ),
    differentiable=False,
)
def transformer_attribution(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    *,
    start_layer: int = 0,
) -> Explanation:
    """LRP relevance of the attention maps weighted by their gradients, rolled out: ``(B, gh, gw)``.

    ``Abar_b = mean_h (dy/dA_b * R_b)^+`` with ``R_b`` the LRP relevance of block ``b``'s
    attention probabilities (start: ``one_hot(target)``; with a foil, the target's ``R_b`` minus
    the foil's, see :func:`contrast_propagate`) and ``y`` the score of
    :func:`relreg.explain._contract.score`; map = read-out row of ``prod_b (I + Abar_b)`` (later
    blocks on the left, blocks ``>= start_layer``), patch columns. Raw, not normalised.

    Raises:
        ValueError: for ``differentiable=True`` / ``second_order=True``, a bad ``start_layer`` or
            image size, or an unsupported pooling/head.
        TypeError: for a model that is not a timm VisionTransformer, Eva or Beit built from its
            own blocks (:func:`relreg.explain.lrp_models.check_lrp_model`).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> transformer_attribution(model, torch.randn(2, 3, 32, 32)).maps.shape
        torch.Size([2, 4, 4])
    """
    _prepare(model, images, "transformer_attribution", differentiable, second_order)
    check_start_layer(start_layer, len(model.blocks))
    check_grad_mode("transformer_attribution")
    # the input as a leaf that requires grad: the graph reaches every attention map whatever the
    # parameters' requires_grad flags; the gradients are taken of the attention maps only
    x = images.detach().requires_grad_(True)
    with torch.enable_grad():
        fwd = functional_forward(model, x)
        tgt, fl = resolve_classes(fwd.logits, target, foil)
        used = [c.attn for c in fwd.blocks[start_layer:]]
        grads = torch.autograd.grad(score(fwd.logits, tgt, fl).sum(), used)
    relevance, _ = contrast_propagate(model, fwd, tgt, fl, start_layer)
    with torch.no_grad():
        v = _readout(model, relevance[start_layer])
        for i in range(len(fwd.blocks) - 1, start_layer - 1, -1):
            abar = (grads[i - start_layer] * relevance[i]).clamp(min=0).mean(dim=1)
            v = v + torch.bmm(v.unsqueeze(1), abar)[:, 0]
    return finish(_to_grid(model, images, v), fwd.logits, False)


@register_explainer(
    "partial_lrp",
    output="grid",
    paper=(
        "Voita et al., Analyzing Multi-Head Self-Attention, ACL 2019 "
        "(as used by Chefer et al., CVPR 2021)"
    ),
    differentiable=False,
)
def partial_lrp(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    *,
    rules: str = "conservative",
) -> Explanation:
    """LRP relevance of the last block's attention probabilities: ``(B, gh, gw)``, raw.

    ``mean_h R_L^+`` (positive part, head mean), read-out row, patch columns; the LRP start is
    ``one_hot(target)`` (with a foil: ``R_L`` of the target minus that of the foil).

    Args:
        rules: ``"conservative"`` (the CVPR 2021 paper's own rules, see the module docstring) or
            ``"cvpr2021_baseline"`` (the standard LRP layers the paper ran this baseline with, its
            ``method="last_layer"``; see :mod:`relreg.explain.lrp_baseline`).

    Raises:
        ValueError, TypeError: as :func:`transformer_attribution`; ValueError for an unknown
            ``rules``.
    """
    _prepare(model, images, "partial_lrp", differentiable, second_order, rules)
    with torch.no_grad():
        fwd = functional_forward(model, images.detach())
        tgt, fl = resolve_classes(fwd.logits, target, foil)
        last = len(fwd.blocks) - 1
        relevance, _ = _relevances(model, fwd, tgt, fl, last, False, rules)
        abar = relevance[last].clamp(min=0).mean(dim=1)
        row = torch.bmm(_readout(model, abar).unsqueeze(1), abar)[:, 0]
    return finish(_to_grid(model, images, row), fwd.logits, False)


@register_explainer(
    "lrp",
    output="pixel",
    paper=(
        "Bach et al., Layer-Wise Relevance Propagation, PLoS ONE 2015 "
        "(ViT rules of Chefer et al., CVPR 2021)"
    ),
    differentiable=False,
)
def lrp(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    *,
    rules: str = "conservative",
) -> Explanation:
    """Full LRP down to the pixels, summed over colour channels: ``(B, H, W)``, raw (signed).

    Under the default rules the start relevance ``one_hot(target)`` is conserved layer by layer
    except for the share the prefix tokens and the position embedding take (see the module
    docstring). With a foil: the target's pixel relevance minus the foil's. With
    ``dynamic_img_pad`` the padded border's relevance is dropped.

    Args:
        rules: ``"conservative"`` (default) or ``"cvpr2021_baseline"``: the standard LRP layers the
            CVPR 2021 paper ran this baseline with (its ``method="full"``), which do not conserve
            the start relevance (see :mod:`relreg.explain.lrp_baseline`).

    Raises:
        ValueError, TypeError: as :func:`transformer_attribution`; ValueError for an unknown
            ``rules``.
    """
    _prepare(model, images, "lrp", differentiable, second_order, rules)
    with torch.no_grad():
        fwd = functional_forward(model, images.detach())
        tgt, fl = resolve_classes(fwd.logits, target, foil)
        _, pixels = _relevances(model, fwd, tgt, fl, 0, True, rules)
        assert pixels is not None
        maps = pixels[..., : images.shape[-2], : images.shape[-1]].sum(dim=1)
    return finish(maps, fwd.logits, False)
