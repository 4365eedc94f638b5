"""The explainers' shared internal contract: what every registered explainer checks and returns.

Image checks, logits checks, target/foil resolution, the explained score, the grad-mode and
``start_layer`` checks, and the :class:`Explanation` type (exported publicly by
:mod:`relreg.explain`). Every explainer module imports from here, never from another explainer
module.

The explained score of sample ``i`` is the logit (pre-softmax) ``y[i, target[i]]``, or the
contrast ``y[i, target[i]] - y[i, foil[i]]`` when a foil class is given ("why this class rather
than that one"). The scores of a batch are summed before the one backward pass: samples do not
interact in a ViT, so the gradient of the sum holds every sample's own gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from relreg.validate import check_positive_int

__all__ = [
    "Explanation",
    "ScoreFn",
    "Target",
    "TargetLike",
    "check_grad_mode",
    "check_images",
    "check_logits",
    "check_start_layer",
    "expand_baseline",
    "finish",
    "graph_input",
    "pair",
    "perturbed_scores",
    "reference_scores",
    "repeat_target",
    "resolve_classes",
    "score",
    "target_weights",
]

TargetLike = int | Sequence[int] | Tensor | Callable[[Tensor], Tensor] | None


class ScoreFn:
    """A target given as a function of the logits, ``f(logits (M, K)) -> (M,)``.

    ``f`` must work row by row (row ``i`` of its output depends on row ``i`` of the logits only:
    a margin, a log-sum-exp over a label set, a regression output), because explainers score
    chunks and repeated copies of the batch. Indexing and repeating return the same function.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, logits: Tensor) -> Tensor:
        out = self.fn(logits)
        if not isinstance(out, Tensor) or out.shape != (logits.shape[0],):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"Expected the target function to return shape ({logits.shape[0]},) for logits of "
                f"shape {tuple(logits.shape)}, but got {got}."
            )
        return out

    def __getitem__(self, index: object) -> ScoreFn:
        return self

    def to(self, *args: object, **kwargs: object) -> ScoreFn:
        return self


Target = Tensor | ScoreFn  # (B,) long classes, (B, K) float weights, or a function


def repeat_target(target: Target, times: int) -> Target:
    """``target`` for ``times`` stacked copies of the batch."""
    if isinstance(target, ScoreFn):
        return target
    return target.repeat(times) if target.ndim == 1 else target.repeat(times, 1)


def target_weights(target: Target, logits: Tensor) -> Tensor:
    """``(B, K)`` weights ``w`` with ``score = sum_k w_k y_k`` (to first order): one-hot classes,
    the weights themselves, or the gradient of a target function at ``logits``."""
    if isinstance(target, ScoreFn):
        with torch.enable_grad():
            y = logits.detach().requires_grad_(True)
            (w,) = torch.autograd.grad(target(y).sum(), y, allow_unused=True)
        return torch.zeros_like(logits) if w is None else w
    if target.is_floating_point():
        return target.to(logits.dtype)
    return torch.nn.functional.one_hot(target, logits.shape[1]).to(logits.dtype)


class Explanation(NamedTuple):
    """What every registered explainer returns.

    Attributes:
        maps: raw relevance, ``(B, gh, gw)`` or ``(B, H, W)``.
        logits: ``(B, K)`` logits of the clean images from the same call (so a training step can
            use one forward pass for both the classification loss and the relevance).
    """

    maps: Tensor
    logits: Tensor


def finish(maps: Tensor, logits: Tensor, differentiable: bool) -> Explanation:
    """Package an explanation; detach both parts unless ``differentiable``."""
    if differentiable:
        return Explanation(maps, logits)
    return Explanation(maps.detach(), logits.detach())


def _in_channels(model: nn.Module) -> int | None:
    embed = getattr(model, "patch_embed", None)
    proj = getattr(embed, "proj", None) or getattr(embed, "projection", None)  # timm / transformers
    return getattr(proj, "in_channels", None)


def check_images(model: nn.Module, images: Tensor) -> None:
    """Raise a clear error unless ``images`` is a finite float batch for ``model``.

    Raises:
        TypeError: for a model that is not an ``nn.Module`` or images that are not a float tensor.
        ValueError: for images not ``(B, C, H, W)`` with the model's channels, an empty batch, or
            NaN or infinite values.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be a torch.nn.Module, but got {type(model).__name__}.")
    if not isinstance(images, Tensor):
        raise TypeError(f"Expected images to be a torch.Tensor, but got {type(images).__name__}.")
    if images.ndim != 4:
        raise ValueError(
            f"Expected images of shape (B, C, H, W), but got shape {tuple(images.shape)}."
        )
    if not images.is_floating_point():
        raise TypeError(f"Expected images of a floating dtype, but got {images.dtype}.")
    channels = _in_channels(model)
    if channels is not None and images.shape[1] != channels:
        raise ValueError(
            f"Expected images with {channels} channels for this model, but got {images.shape[1]} "
            f"(shape {tuple(images.shape)})."
        )
    if images.shape[0] == 0:
        raise ValueError("Expected a non-empty batch of images, but got B = 0.")
    if not torch.isfinite(images).all():
        nan = int(images.isnan().sum())
        inf = int(images.isinf().sum())
        raise ValueError(f"Expected finite images, but got {nan} NaN and {inf} Inf values.")


def check_logits(logits: object, batch: int) -> Tensor:
    """Return ``logits`` ``(B, K)`` or raise if the model's output is not one."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"Expected the model to return logits of shape ({batch}, num_classes), but got {shape}."
        )
    return logits


def _as_classes(
    value: TargetLike, name: str, batch: int, num_classes: int, device: torch.device
) -> Tensor:
    if isinstance(value, bool | str | bytes) or not isinstance(value, int | Sequence | Tensor):
        raise TypeError(
            f"Expected {name} to be an int or a (B,) integer tensor, "
            f"but got {type(value).__name__}."
        )
    t = torch.as_tensor(value, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"Expected {name} of an integer dtype, but got {t.dtype}.")
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"Expected {name} to be an int or of shape ({batch},), but got shape {tuple(t.shape)}."
        )
    bad = (t < 0) | (t >= num_classes)
    if bad.any():
        raise ValueError(
            f"Expected {name} classes in [0, {num_classes - 1}] (the model has {num_classes} "
            f"classes), but got {sorted(set(t[bad].tolist()))}."
        )
    return t.long()


def _weights(value: Tensor, batch: int, num_classes: int, logits: Tensor) -> Tensor:
    w = value.to(logits.device, logits.dtype)
    if w.ndim == 1 and w.shape[0] == num_classes:
        w = w.expand(batch, num_classes)
    if w.shape != (batch, num_classes) or not torch.isfinite(w).all():
        raise ValueError(
            f"Expected float target weights of shape ({batch}, {num_classes}) or ({num_classes},), "
            f"finite, but got shape {tuple(value.shape)}."
        )
    return w


def resolve_classes(
    logits: Tensor, target: TargetLike, foil: TargetLike
) -> tuple[Target, Tensor | None]:
    """What each sample explains: ``target=None`` the top-1 class; an int or ``(B,)`` integer
    tensor a class (``(B,)`` long); a float ``(B, K)`` (or ``(K,)``) tensor the weighted sum
    ``sum_k w_k y_k`` of the logits; a callable ``f(logits) -> (B,)`` its value (a
    :class:`ScoreFn`). A foil class (int or ``(B,)``) is allowed with class targets only.

    Raises:
        TypeError, ValueError: for classes of the wrong type, shape or range, weights of the wrong
            shape, a foil with a non-class target, or a foil equal to the target of some sample.
    """
    batch, num_classes = logits.shape
    if callable(target) or (isinstance(target, Tensor) and target.is_floating_point()):
        if foil is not None:
            raise TypeError(
                "Expected foil=None with a target function or target weights (a foil needs a "
                "class target; fold the contrast into the weights or the function instead)."
            )
        if callable(target):
            return ScoreFn(target), None
        return _weights(target, batch, num_classes, logits), None
    if target is None:
        tgt = logits.detach().argmax(dim=1)
    else:
        tgt = _as_classes(target, "target", batch, num_classes, logits.device)
    if foil is None:
        return tgt, None
    fl = _as_classes(foil, "foil", batch, num_classes, logits.device)
    same = (fl == tgt).nonzero().flatten()
    if same.numel():
        raise ValueError(
            f"Expected foil to differ from the target class, but they are equal for samples "
            f"{same.tolist()} (class {tgt[same].tolist()})."
        )
    return tgt, fl


def score(logits: Tensor, target: Target, foil: Tensor | None = None) -> Tensor:
    """Per-sample explained score ``(B,)``: ``y_target``, ``y_target - y_foil``, ``sum_k w_k y_k``
    for weights ``(B, K)``, or ``f(logits)`` for a :class:`ScoreFn`."""
    if isinstance(target, ScoreFn):
        return target(logits)
    if target.is_floating_point():
        return (logits * target.to(logits.dtype)).sum(1)
    s = logits.gather(1, target[:, None])[:, 0]
    if foil is not None:
        s = s - logits.gather(1, foil[:, None])[:, 0]
    return s


def check_grad_mode(method: str) -> None:
    """Gradient explainers cannot run under ``torch.inference_mode()``: say how to fix it."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"Explainer {method!r} needs gradients, but torch.inference_mode() is on. "
            "Call it under torch.no_grad() or outside inference mode "
            "(Lightning: Trainer(inference_mode=False))."
        )


def check_start_layer(start_layer: int, depth: int) -> None:
    """Raise unless ``start_layer`` is an int in ``[0, depth - 1]``.

    ``depth`` is the model's number of blocks.
    """
    if (
        isinstance(start_layer, bool)
        or not isinstance(start_layer, int)
        or not 0 <= start_layer < depth
    ):
        raise ValueError(
            f"Expected start_layer an int in [0, {depth - 1}], but got {start_layer!r}."
        )


def graph_input(model: nn.Module, images: Tensor, track: bool) -> Tensor:
    """The tensor to feed the model so that, when ``track``, a graph reaches every block.

    When the patch embedding trains (fine-tuning) the parameters start the graph and ``images`` is
    returned as is; otherwise a detached copy that requires grad does (cheap, but not free: a
    final backward would also compute its gradient, so it is made only when needed).
    """
    embed = getattr(model, "patch_embed", None)
    trains = embed is not None and any(p.requires_grad for p in embed.parameters())
    if track and not images.requires_grad and not trains:
        return images.detach().requires_grad_(True)
    return images


def reference_scores(
    model: nn.Module, images: Tensor, target: TargetLike, foil: TargetLike
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Check the batch and resolve the classes on the clean images: one no-grad forward pass.

    Returns:
        ``(target (B,), foil (B,) or None, logits (B, K))``.
    """
    check_images(model, images)
    with torch.no_grad():
        logits = check_logits(model(images.detach()), images.shape[0])
    return (*resolve_classes(logits, target, foil), logits)


def pair(name: str, value: object) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair of ints >= 1 (window, stride, patch sizes)."""
    values = tuple(value) if isinstance(value, Sequence) else (value, value)
    if len(values) != 2 or not all(type(v) is int and v >= 1 for v in values):
        raise ValueError(f"Expected {name} an int >= 1 or a pair of them, but got {value!r}.")
    return values


def expand_baseline(baseline: float | Tensor, images: Tensor) -> Tensor:
    """``baseline`` (a float or a tensor) broadcast to ``images`` ``(B, C, H, W)``."""
    if not isinstance(baseline, int | float | Tensor) or isinstance(baseline, bool):
        raise TypeError(
            f"Expected baseline a float or a tensor, but got {type(baseline).__name__}."
        )
    base = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
    try:
        return base.expand_as(images)
    except RuntimeError as err:
        raise ValueError(
            f"Expected baseline to broadcast to images {tuple(images.shape)}, but got shape "
            f"{tuple(base.shape)}."
        ) from err


def perturbed_scores(
    model: nn.Module,
    make: Callable[[Tensor, Tensor], Tensor],
    batch: int,
    count: int,
    target: Tensor,
    foil: Tensor | None,
    internal_batch_size: int | None,
    progress: bool | None,
    desc: str,
    probability: bool = False,
) -> Tensor:
    """Scores ``(B, count)`` of ``count`` perturbed copies of every image, without gradients.

    ``make(b, v)`` returns the copies ``(n, C, H, W)`` for image indices ``b`` and copy indices
    ``v`` (both ``(n,)`` long); the ``B * count`` copies go through the model
    ``internal_batch_size`` at a time (None: all at once), so the result does not depend on the
    chunking. ``probability``: score the target's softmax probability instead of the logit.
    """
    from tqdm.auto import tqdm

    if internal_batch_size is not None:
        check_positive_int("internal_batch_size", internal_batch_size)
    total = batch * count
    step = total if internal_batch_size is None else internal_batch_size
    starts = range(0, total, step)
    show = True if progress is None else bool(progress)
    delay = 5.0 if progress is None else 0.0  # by default only runs longer than 5 s show a bar
    out = []
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else None
    with torch.no_grad():
        for start in tqdm(
            starts, desc=desc, unit="pass", disable=not show, leave=False, delay=delay
        ):
            flat = torch.arange(start, min(start + step, total), device=device)
            b = flat // count
            v = flat % count
            logits = check_logits(model(make(b, v)), flat.numel())
            if probability:
                logits = logits.float().log_softmax(1).exp()
            out.append(score(logits, target[b], None if foil is None else foil[b]))
    return torch.cat(out).view(batch, count)
