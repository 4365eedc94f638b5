"""A small registry of explainers: register, list, create by name, and the one verb ``explain``.

Every explainer is a function ``fn(model, images, target=None, foil=None, differentiable=False,
second_order=False, **options) -> Explanation`` (the maps and the logits of the same forward pass);
attention explainers give ``(B, gh, gw)`` patch-grid relevance and gradient explainers
``(B, H, W)`` pixel maps, both raw (use :func:`relreg.explain.to_pixels` to upsample and
normalise). :func:`explain` returns the maps; :func:`explain_with_logits` both.

The entries live in :data:`EXPLAINERS`, a :class:`relreg.registry.Registry` of
:class:`ExplainerInfo` whose check refuses a function that does not take the common arguments first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from relreg.explain._contract import Explanation, TargetLike, check_images
from relreg.explain.huggingface import as_explainable
from relreg.registry import Registry

__all__ = [
    "EXPLAINERS",
    "ExplainerInfo",
    "Explainer",
    "register_explainer",
    "list_explainers",
    "explainer_info",
    "create_explainer",
    "explain",
]

ExplainFn = Callable[..., Explanation]
_COMMON = ("model", "images", "target", "foil", "differentiable", "second_order")
OUTPUTS = ("grid", "pixel")


@dataclass(frozen=True)
class ExplainerInfo:
    """What the registry knows of an explainer.

    Attributes:
        name: registry name.
        fn: the function.
        output: ``"grid"`` for ``(B, gh, gw)`` patch-grid maps, ``"pixel"`` for ``(B, H, W)``.
        paper: the method's reference.
        options: names of the method's own keyword options (e.g. ``start_layer``).
        differentiable: whether ``differentiable=True`` is supported (maps a loss can train).
    """

    name: str
    fn: ExplainFn
    output: str
    paper: str
    options: tuple[str, ...]
    differentiable: bool = True


def _check_explainer(name: str, info: ExplainerInfo) -> None:
    """Refuse an entry that is not an :class:`ExplainerInfo` of ``name`` whose function takes the
    common arguments first."""
    if not isinstance(info, ExplainerInfo):
        raise TypeError(f"Expected explainer {name!r} an ExplainerInfo, but got {info!r}.")
    if info.name != name:
        raise ValueError(f"Expected the ExplainerInfo of {name!r}, but got that of {info.name!r}.")
    if info.output not in OUTPUTS:
        raise ValueError(f"Expected output 'grid' or 'pixel', but got {info.output!r}.")
    params = tuple(inspect.signature(info.fn).parameters)
    if params[: len(_COMMON)] != _COMMON:
        raise TypeError(
            f"Expected explainer {name!r} to take {_COMMON} first, but it takes {params}."
        )


EXPLAINERS: Registry[ExplainerInfo] = Registry("explainer", check=_check_explainer)


def register_explainer(
    name: str, output: str, paper: str, differentiable: bool = True
) -> Callable[[ExplainFn], ExplainFn]:
    """Decorator that registers ``fn`` under ``name`` (see the module docstring for the signature).

    ``differentiable=False`` marks methods whose maps cannot carry gradients (the registry then
    refuses ``differentiable=True`` and ``second_order=True`` for them).
    """

    def wrap(fn: ExplainFn) -> ExplainFn:
        options = tuple(inspect.signature(fn).parameters)[len(_COMMON) :]
        EXPLAINERS.register(name, ExplainerInfo(name, fn, output, paper, options, differentiable))
        return fn

    return wrap


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The original module of a ``torch.compile``'d model (explainers hook its submodules, which
    compiled graphs do not run eagerly); any other module unchanged."""
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else model


def list_explainers() -> list[str]:
    """Names of the registered explainers, sorted."""
    return sorted(EXPLAINERS)


def explainer_info(name: str) -> ExplainerInfo:
    """The registry entry of ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    return EXPLAINERS.get(name)


def _check_options(info: ExplainerInfo, options: dict[str, object]) -> None:
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        allowed = ", ".join(info.options) or "none"
        raise TypeError(
            f"Explainer {info.name!r} got unknown options {unknown}; its options are: {allowed}."
        )


def explain(
    model: nn.Module,
    images: Tensor,
    method: str = "chefer",
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    **options: object,
) -> Tensor:
    """Explain a batch with one registered method.

    The model is used as it is: its train/eval mode and ``requires_grad`` flags are left unchanged
    (call ``model.eval()`` first for inference-time explanations).

    Args:
        model: a timm ViT or a ``transformers`` ViT / DeiT / BEiT classifier (any classifier
            for the gradient and perturbation methods; see :mod:`relreg.explain.huggingface`).
        images: ``(B, C, H, W)`` input batch, normalised as the model expects.
        method: a name from :func:`list_explainers`.
        target: class to explain: None (top-1 per sample), an int, or a ``(B,)`` tensor.
        foil: optional contrast class (int or ``(B,)``): explains ``y_target - y_foil``.
        differentiable: keep the autograd graph so that a loss on the maps reaches the model's
            parameters (attention gradients as constants); False returns detached maps.
        second_order: also differentiate through the gradients (``create_graph=True``); implies
            ``differentiable``.
        **options: the method's own options, e.g. ``start_layer`` for ``chefer``/``rollout``.

    Returns:
        Raw relevance: ``(B, gh, gw)`` for attention methods, ``(B, H, W)`` for gradient methods.

    Example:
        >>> import timm, torch
        >>> from relreg.explain import explain, to_pixels
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                           patch_size=8, num_classes=3).eval()
        >>> images = torch.randn(2, 3, 32, 32)
        >>> maps = explain(model, images, method="chefer")
        >>> to_pixels(maps, size=images.shape[-2:]).shape
        torch.Size([2, 32, 32])
    """
    return explain_with_logits(
        model, images, method, target, foil, differentiable, second_order, **options
    ).maps


def explain_with_logits(
    model: nn.Module,
    images: Tensor,
    method: str = "chefer",
    target: TargetLike = None,
    foil: TargetLike = None,
    differentiable: bool = False,
    second_order: bool = False,
    **options: object,
) -> Explanation:
    """Like :func:`explain`, but also returns the logits ``(B, K)`` of the clean images.

    For attention methods and ``saliency`` / ``input_x_gradient`` they come from the very forward
    pass that produced the maps (with ``differentiable=True`` they keep its graph), so a training
    step needs one forward pass for both its classification loss and its relevance loss.
    """
    info = explainer_info(method)
    _check_options(info, options)
    for flag_name, flag in (("differentiable", differentiable), ("second_order", second_order)):
        if not isinstance(flag, bool):
            raise TypeError(f"Expected {flag_name} to be a bool, but got {type(flag).__name__}.")
    if (differentiable or second_order) and not info.differentiable:
        trainable = ", ".join(n for n in list_explainers() if EXPLAINERS.get(n).differentiable)
        raise ValueError(
            f"Explainer {method!r} is not differentiable: expected differentiable=False and "
            f"second_order=False, but got {differentiable} and {second_order}. "
            f"Differentiable explainers: {trainable}."
        )
    model = as_explainable(unwrap_compiled(model))
    check_images(model, images)
    return info.fn(
        model,
        images,
        target=target,
        foil=foil,
        differentiable=differentiable or second_order,
        second_order=second_order,
        **options,
    )


class Explainer:
    """An explainer bound to a model and options: ``explainer(images, target=None, foil=None)``.

    Args:
        name: a name from :func:`list_explainers`.
        model: the model to explain.
        differentiable: see :func:`explain`.
        second_order: see :func:`explain`.
        **options: the method's own options.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        differentiable: bool = False,
        second_order: bool = False,
        **options: object,
    ) -> None:
        self.info = explainer_info(name)
        _check_options(self.info, options)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected model to be a torch.nn.Module, but got {type(model).__name__}."
            )
        self.name = name
        self.model = model
        self.differentiable = differentiable
        self.second_order = second_order
        self.options = options

    def __call__(
        self, images: Tensor, target: TargetLike = None, foil: TargetLike = None
    ) -> Tensor:
        """Explain ``images`` ``(B, C, H, W)``; returns what :func:`explain` returns."""
        return explain(
            self.model,
            images,
            self.name,
            target,
            foil,
            self.differentiable,
            self.second_order,
            **self.options,
        )

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (
            f"Explainer({self.name!r}, differentiable={self.differentiable}, "
            f"second_order={self.second_order}{opts})"
        )


def create_explainer(name: str, model: nn.Module, **kwargs: object) -> Explainer:
    """Create an :class:`Explainer` by registry name (``differentiable``, ``second_order`` and the
    method's options may be given as keywords)."""
    return Explainer(name, model, **kwargs)
