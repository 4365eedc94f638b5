"""Input-gradient explainers: saliency, input x gradient, SmoothGrad, integrated gradients.

- ``saliency``: Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks", ICLR-W 2014
  (max over channels of ``|dy/dx|``).
- ``input_x_gradient``: Shrikumar et al., "Not Just a Black Box", 2016 (channel sum of
  ``x * dy/dx``).
- ``smoothgrad``: Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017 (mean of
  ``|dy/dx|`` over noisy copies, max over channels).
- ``integrated_gradients``: Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks",
  ICML 2017 (midpoint Riemann sum, channel sum; the map sums to ``y(x) - y(baseline)``).

All return raw ``(B, H, W)`` pixel maps and work on any differentiable classifier. The noisy
copies and the path points of a batch go through the model together (chunked by
``internal_batch_size``). ``differentiable=True`` needs ``create_graph=True`` here: the map *is*
a gradient, so it is the same as ``second_order=True``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from relreg.explain._contract import (
    Explanation,
    TargetLike,
    check_grad_mode,
    check_logits,
    expand_baseline,
    finish,
    reference_scores,
    repeat_target,
    resolve_classes,
    score,
)
from relreg.explain.capture import unfused_attention
from relreg.explain.registry import register_explainer
from relreg.validate import check_positive_int

__all__ = ["saliency", "input_x_gradient", "smoothgrad", "integrated_gradients"]


def _input_gradient(
    model: nn.Module, inputs: Tensor, target: Tensor, foil: Tensor | None, create_graph: bool
) -> Tensor:
    """``d score / d inputs`` for a batch ``(M, C, H, W)`` whose classes are ``target`` ``(M,)``."""
    x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
    with torch.enable_grad(), _maybe_unfused(model, create_graph):
        logits = check_logits(model(x), x.shape[0])
        (grad,) = torch.autograd.grad(
            score(logits, target, foil).sum(), x, create_graph=create_graph
        )
    return grad


def _maybe_unfused(model: nn.Module, create_graph: bool) -> AbstractContextManager:
    return unfused_attention(model) if create_graph else nullcontext()


def _repeated_gradients(
    model: nn.Module,
    points: Tensor,
    target: Tensor,
    foil: Tensor | None,
    create_graph: bool,
    chunk: int | None,
) -> Tensor:
    """Gradients at ``points`` ``(S, B, C, H, W)`` (S copies of the batch), of the same shape."""
    s, b = points.shape[:2]
    flat = points.flatten(0, 1)
    tgt = repeat_target(target, s)
    fl = foil.repeat(s) if foil is not None else None
    step = flat.shape[0] if chunk is None else chunk
    grads = [
        _input_gradient(
            model,
            flat[i : i + step],
            tgt[i : i + step],
            None if fl is None else fl[i : i + step],
            create_graph,
        )
        for i in range(0, flat.shape[0], step)
    ]
    return torch.cat(grads).view_as(points)


@register_explainer(
    "saliency",
    output="pixel",
    paper="Simonyan, Vedaldi & Zisserman, Deep Inside Convolutional Networks, ICLR Workshop 2014",
)
def saliency(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
) -> Explanation:
    """Max over channels of ``|d score / d x|``: ``(B, H, W)``."""
    check_grad_mode("saliency")
    grad, logits = _single_pass_gradient(model, images, target, foil, differentiable)
    return finish(grad.abs().amax(dim=1), logits, differentiable)


@register_explainer(
    "input_x_gradient",
    output="pixel",
    paper="Shrikumar, Greenside, Shcherbina & Kundaje, Not Just a Black Box, arXiv 2016",
)
def input_x_gradient(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
) -> Explanation:
    """Channel sum of ``x * d score / d x``: ``(B, H, W)`` (signed)."""
    check_grad_mode("input_x_gradient")
    grad, logits = _single_pass_gradient(model, images, target, foil, differentiable)
    return finish((images * grad).sum(dim=1), logits, differentiable)


def _single_pass_gradient(
    model: nn.Module, images: Tensor, target: TargetLike, foil: TargetLike, differentiable: bool
) -> tuple[Tensor, Tensor]:
    """One forward and one backward: the top-1 target comes from the same forward pass."""
    x = images if images.requires_grad else images.detach().requires_grad_(True)
    with torch.enable_grad(), _maybe_unfused(model, differentiable):
        logits = check_logits(model(x), images.shape[0])
        tgt, fl = resolve_classes(logits, target, foil)
        (grad,) = torch.autograd.grad(score(logits, tgt, fl).sum(), x, create_graph=differentiable)
    return grad, logits


@register_explainer(
    "smoothgrad",
    output="pixel",
    paper="Smilkov, Thorat, Kim, Viegas & Wattenberg, SmoothGrad, arXiv 2017",
)
def smoothgrad(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    n_samples: int = 16,
    noise_level: float = 0.15,
    seed: int = 0,
    internal_batch_size: int | None = None,
) -> Explanation:
    """Mean over ``n_samples`` noisy copies of ``|d score / d x|``, channel max: ``(B, H, W)``.

    Noise is Gaussian with std ``noise_level * (max(x) - min(x))`` per image, drawn from a
    generator seeded with ``seed`` (deterministic, and independent of the batch's other images);
    the target is resolved on the clean images.
    """
    check_grad_mode("smoothgrad")
    check_positive_int("n_samples", n_samples)
    _check_chunk(internal_batch_size)
    if not isinstance(noise_level, int | float) or noise_level < 0:
        raise ValueError(f"Expected noise_level a float >= 0, but got {noise_level!r}.")
    tgt, fl, logits = reference_scores(model, images, target, foil)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    # One noise draw per copy, shared by the images of the batch: an image's map does not depend
    # on what else is in its batch, so batched and one-at-a-time results agree.
    noise = torch.randn((n_samples, 1, *images.shape[1:]), generator=gen, dtype=images.dtype).to(
        images.device
    )
    flat = images.detach().flatten(1)
    sigma = noise_level * (flat.amax(dim=1) - flat.amin(dim=1))
    points = images.unsqueeze(0) + noise * sigma.view(1, -1, 1, 1, 1)
    grads = _repeated_gradients(model, points, tgt, fl, differentiable, internal_batch_size)
    return finish(grads.abs().mean(dim=0).amax(dim=1), logits, differentiable)


@register_explainer(
    "integrated_gradients",
    output="pixel",
    paper="Sundararajan, Taly & Yan, Axiomatic Attribution for Deep Networks, ICML 2017",
)
def integrated_gradients(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    steps: int = 32,
    baseline: float | Tensor = 0.0,
    internal_batch_size: int | None = None,
) -> Explanation:
    """Integrated gradients from ``baseline``, channel sum: ``(B, H, W)`` (signed).

    Midpoint Riemann sum over ``steps`` points; ``map.sum() ~= y(x) - y(baseline)`` per image
    (completeness), more exactly as ``steps`` grows. ``baseline`` is a float or a tensor that
    broadcasts to ``images`` (0: the normalised mean colour for mean/std-normalised inputs).
    """
    check_grad_mode("integrated_gradients")
    check_positive_int("steps", steps)
    _check_chunk(internal_batch_size)
    base = expand_baseline(baseline, images)
    tgt, fl, logits = reference_scores(model, images, target, foil)
    alphas = (torch.arange(steps, dtype=images.dtype, device=images.device) + 0.5) / steps
    points = base.unsqueeze(0) + alphas.view(-1, 1, 1, 1, 1) * (images - base).unsqueeze(0)
    grads = _repeated_gradients(model, points, tgt, fl, differentiable, internal_batch_size)
    return finish(((images - base) * grads.mean(dim=0)).sum(dim=1), logits, differentiable)


def _check_chunk(value: object) -> None:
    if value is not None:
        check_positive_int("internal_batch_size", value)
