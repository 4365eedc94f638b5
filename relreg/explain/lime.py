"""LIME: fit a weighted linear model of the explained score on which image regions are kept
(Ribeiro, Singh & Guestrin, "'Why Should I Trust You?' Explaining the Predictions of Any
Classifier", KDD 2016).

As in the authors' package (marcotcr/lime, ``lime/lime_image.py`` and ``lime/lime_base.py``):
``n_samples`` on/off vectors over the features are drawn uniformly, the first keeps every feature;
an "off" feature is filled with ``baseline`` (``"mean"``: the feature's mean colour, the package's
``hide_color=None``); each sample is weighted by ``sqrt(exp(-d^2 / kernel_width^2))`` with ``d``
the cosine distance to the all-on vector and ``kernel_width = 0.25``; a ridge regression with
intercept and ``alpha = 1`` is fitted per image, and the map paints each feature's coefficient on
its pixels. Differences, stated: the features default to the ViT's patch grid rather than
quickshift superpixels (pass ``features`` for superpixels from any segmenter), the explained
score is the target logit (or the target-minus-foil contrast) like every relreg explainer
(``score_of="probability"`` for the package's softmax probability), all features are kept (the
package's default ``num_features=100000``), and the samples are drawn from ``seed`` feature by
feature and shared by the images of a batch, so an image's map does not depend on its batch.
Feature ids are renumbered 0..n-1 per image (ids no pixel carries are dropped), and the ridge is
fitted in float64 whatever the model's dtype.

Model-agnostic and not differentiable; the perturbed copies are scored in chunks of
``internal_batch_size`` images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from relreg.explain._contract import (
    Explanation,
    TargetLike,
    expand_baseline,
    pair,
    perturbed_scores,
    reference_scores,
)
from relreg.explain.registry import register_explainer
from relreg.validate import check_choice, check_positive_int

__all__ = ["lime", "lime_kernel", "patch_features", "weighted_ridge"]


def patch_features(size: tuple[int, int], patch: tuple[int, int]) -> Tensor:
    """``(H, W)`` long feature ids of a patch grid, row-major (a ViT's tokens)."""
    h, w = size
    ph, pw = patch
    rows = torch.arange(h) // ph
    cols = torch.arange(w) // pw
    return rows[:, None] * ((w + pw - 1) // pw) + cols[None, :]


def lime_kernel(samples: Tensor, kernel_width: float = 0.25) -> Tensor:
    """LIME's sample weights ``(S,)`` for on/off ``samples`` ``(S, F)``: the exponential kernel
    ``sqrt(exp(-d^2 / w^2))`` of the cosine distance ``d`` to the all-on vector (``d = 1`` for an
    all-off sample, as scikit-learn's cosine distance of a zero vector)."""
    on = samples.sum(1)
    cos = on / (on.sqrt() * samples.shape[1] ** 0.5).clamp_min(1e-12)
    d = 1 - torch.where(on > 0, cos, torch.zeros_like(cos))
    return torch.exp(-(d**2) / kernel_width**2).sqrt()


def weighted_ridge(x: Tensor, y: Tensor, weight: Tensor, alpha: float = 1.0) -> Tensor:
    """Coefficients ``(B, F)`` of ridge regressions with an unpenalised intercept, one per row of
    ``y`` ``(B, S)``, on shared inputs ``x`` ``(S, F)`` and sample weights ``weight`` ``(S,)``:
    scikit-learn's ``Ridge(alpha, fit_intercept=True).fit(x, y, sample_weight=weight)``."""
    w = weight / weight.sum()
    x_mean = w @ x
    y_mean = y @ w
    xs = (x - x_mean) * weight.sqrt()[:, None]
    ys = (y - y_mean[:, None]) * weight.sqrt()[None, :]
    gram = xs.T @ xs + alpha * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(gram, xs.T @ ys.T).T


@register_explainer(
    "lime",
    output="pixel",
    paper="Ribeiro, Singh & Guestrin, 'Why Should I Trust You?', KDD 2016",
    differentiable=False,
)
def lime(
    model: nn.Module,
    images: Tensor,
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    n_samples: int = 1000,
    features: Tensor | None = None,
    baseline: float | Tensor | str = 0.0,
    kernel_width: float = 0.25,
    alpha: float = 1.0,
    score_of: str = "logit",
    seed: int = 0,
    internal_batch_size: int | None = 64,
    progress: bool | None = None,
) -> Explanation:
    """Per-feature coefficients of LIME's local linear model, painted on pixels: ``(B, H, W)``.

    Args:
        n_samples: perturbed copies per image (the package's default: 1000).
        features: ``(H, W)`` or ``(B, H, W)`` integer feature ids (e.g. superpixels); default:
            the model's patch grid (``patch_embed.patch_size``, else 16 px squares).
        baseline: fill of "off" features: a float, a tensor broadcastable to ``(B, C, H, W)``,
            or ``"mean"`` (each feature's mean colour).
        kernel_width: width of the exponential kernel on the cosine distance.
        alpha: ridge penalty.
        score_of: ``"logit"`` (the explained logit or contrast) or ``"probability"`` (softmax).
        seed: seed of the on/off samples.
        internal_batch_size: perturbed images per forward pass (None: all at once).
        progress: a progress bar over the forward passes (None: once the call has run 5 s).
    """
    check_positive_int("n_samples", n_samples)
    check_choice("score_of", score_of, ("logit", "probability"))
    if not isinstance(kernel_width, int | float) or kernel_width <= 0:
        raise ValueError(f"Expected kernel_width a float > 0, but got {kernel_width!r}.")
    if not isinstance(alpha, int | float) or alpha < 0:
        raise ValueError(f"Expected alpha a float >= 0, but got {alpha!r}.")
    tgt, fl, logits = reference_scores(model, images, target, foil)
    if score_of == "probability" and fl is not None:
        raise ValueError("Expected no foil with score_of='probability' (a contrast of logits).")
    # ids made contiguous per image (0..n_b-1, in the order of the given ids): ids no pixel
    # carries would be random regressors
    flat_ids, counts = _compact(_feature_ids(model, images, features).flatten(1))  # (B, H*W)
    n_features = max(counts)
    gen = torch.Generator().manual_seed(int(seed))
    # drawn feature by feature, so an image's first n_b columns do not depend on the batch
    samples = torch.randint(0, 2, (n_features, n_samples), generator=gen).T.to(images)
    samples[0] = 1
    base = _baseline(baseline, images, flat_ids, n_features)

    def perturbed(b: Tensor, v: Tensor) -> Tensor:
        keep = samples[v].gather(1, flat_ids[b]).view(-1, 1, *images.shape[-2:])
        return images[b] * keep + base[b] * (1 - keep)

    prob = score_of == "probability"
    scores = perturbed_scores(
        model,
        perturbed,
        batch=images.shape[0],
        count=n_samples,
        target=tgt,
        foil=fl,
        internal_batch_size=internal_batch_size,
        progress=progress,
        desc="lime",
        probability=prob,
    )
    maps = torch.empty(flat_ids.shape, dtype=images.dtype, device=images.device)
    for b, n in enumerate(counts):  # fitted in float64, as the reference package does
        x = samples[:, :n].double()
        coef = weighted_ridge(x, scores[b : b + 1].double(), lime_kernel(x, kernel_width), alpha)
        maps[b] = coef[0].to(images.dtype)[flat_ids[b]]
    return Explanation(maps.view(images.shape[0], *images.shape[-2:]), logits.detach())


def _compact(flat_ids: Tensor) -> tuple[Tensor, list[int]]:
    """Per-image contiguous feature ids ``(B, P)`` and each image's number of features."""
    rows = []
    counts = []
    for ids in flat_ids:
        values, inverse = torch.unique(ids, return_inverse=True)
        rows.append(inverse)
        counts.append(int(values.numel()))
    return torch.stack(rows), counts


def _feature_ids(model: nn.Module, images: Tensor, features: Tensor | None) -> Tensor:
    b = images.shape[0]
    h, w = images.shape[-2:]
    if features is None:
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None) or 16
        return patch_features((h, w), pair("patch_size", patch)).to(images.device).expand(b, h, w)
    if not isinstance(features, Tensor) or features.is_floating_point():
        got = features.dtype if isinstance(features, Tensor) else type(features).__name__
        raise TypeError(f"Expected features an integer tensor, but got {got}.")
    if features.shape not in ((h, w), (b, h, w)) or features.min() < 0:
        raise ValueError(
            f"Expected features of shape ({h}, {w}) or ({b}, {h}, {w}) with ids >= 0, but got "
            f"shape {tuple(features.shape)} and minimum {int(features.min())}."
        )
    return features.to(images.device).long().expand(b, h, w)


def _baseline(
    baseline: float | Tensor | str, images: Tensor, flat_ids: Tensor, n_features: int
) -> Tensor:
    """``(B, C, H, W)`` fill: ``baseline`` expanded, or each feature's mean colour."""
    if not isinstance(baseline, str):
        return expand_baseline(baseline, images)
    check_choice("baseline", baseline, ("mean",))
    b, c = images.shape[:2]
    index = flat_ids[:, None, :].expand(b, c, -1)
    total = images.new_zeros(b, c, n_features).scatter_add_(2, index, images.flatten(2))
    area = images.new_zeros(b, n_features).scatter_add_(
        1, flat_ids, images.new_ones(flat_ids.shape)
    )
    colour = total / area.clamp_min(1)[:, None, :]
    return colour.gather(2, index).view_as(images)
