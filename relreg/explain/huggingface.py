"""Hugging Face ``transformers`` image classifiers through relreg's explainers.

:func:`relreg.explain.explain` wraps a ``transformers`` model on the fly (:func:`as_explainable`),
so ``explain(hf_model, images, "chefer")`` works as it does on a timm ViT:

- ViT-family classifiers (``model_type`` in :data:`SUPPORTED`: ViT, DeiT with or without its
  distillation token, BEiT and data2vec-vision with their relative position bias) become a
  :class:`HuggingFaceViT`: the attention explainers (``chefer``, ``rollout``, ``raw_attention``,
  ``gradcam``) read the attention probabilities ``(B, heads, N, N)`` that the model returns with
  ``output_attentions=True`` under its eager attention implementation (switched on for the call
  and restored afterwards, also after an error), with the model's prefix tokens (CLS, DeiT's
  distillation token), patch grid and read-out (the CLS row, or the patch mean of BEiT's
  mean-pooling head). They run on the dense engine (the chunked engine reads timm's attention
  only).
- Any other image classifier (Swin, ConvNeXt, ...) becomes a :class:`HuggingFaceClassifier`,
  ``images -> logits``: the gradient explainers (``saliency``, ``input_x_gradient``,
  ``smoothgrad``, ``integrated_gradients``) and the perturbation explainers (``occlusion``,
  ``lime``) work on it; the attention explainers raise a ``ValueError`` that says why.

The LRP explainers (``lrp``, ``partial_lrp``, ``transformer_attribution``) need timm's modules
and refuse wrapped models. In training mode with attention dropout, ``transformers`` returns the
probabilities after dropout (timm's capture reads them before); explain in ``eval()`` mode.

Papers: the explainers' own modules cite theirs; the models are Dosovitskiy et al. (ViT, ICLR
2021), Touvron et al. (DeiT, ICML 2021), Bao et al. (BEiT, ICLR 2022).

``transformers`` is an optional dependency (``pip install relreg[hf]``); nothing here imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

__all__ = [
    "SUPPORTED",
    "HuggingFaceClassifier",
    "HuggingFaceViT",
    "as_explainable",
    "is_huggingface_model",
]

SUPPORTED = ("vit", "deit", "beit", "data2vec-vision")
GRADIENT_EXPLAINERS = (
    "saliency, input_x_gradient, smoothgrad, integrated_gradients, occlusion, lime"
)


def is_huggingface_model(model: object) -> bool:
    """True for a ``transformers`` ``PreTrainedModel`` (checked without importing transformers)."""
    return isinstance(model, nn.Module) and any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(model).__mro__
    )


def _image_size(config: object) -> tuple[int, int] | None:
    size = getattr(config, "image_size", None)
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class HuggingFaceClassifier(nn.Module):
    """A ``transformers`` image classifier as a function ``images (B, C, H, W) -> logits (B, K)``.

    Images of another size than the config's ``image_size`` are passed with
    ``interpolate_pos_encoding=True`` (the position table is interpolated, as ``transformers``
    does for ViT-family models).

    Args:
        model: a ``transformers`` model whose output has ``logits`` (``...ForImageClassification``).

    Raises:
        TypeError: if ``model`` is not a ``transformers`` ``PreTrainedModel``.
    """

    def __init__(self, model: nn.Module) -> None:
        if not is_huggingface_model(model):
            raise TypeError(
                f"Expected model to be a transformers PreTrainedModel, "
                f"but got {type(model).__name__}."
            )
        super().__init__()
        self.model = model
        self.model_type = str(getattr(model.config, "model_type", "unknown"))

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, K)`` of ``images`` ``(B, C, H, W)``."""
        return self._run(images).logits

    def _run(self, images: Tensor, **kwargs: object) -> object:
        size = _image_size(self.model.config)
        accepts = inspect.signature(self.model.forward).parameters
        if (
            size is not None
            and tuple(images.shape[-2:]) != size
            and "interpolate_pos_encoding" in accepts
        ):
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=images, return_dict=True, **kwargs)
        if getattr(out, "logits", None) is None:
            raise ValueError(
                f"Expected an image classifier whose output has logits, but "
                f"{type(self.model).__name__} returned {type(out).__name__} without them."
            )
        return out

    def attention_modules(self) -> list[nn.Module]:
        """Refuse: this model is not a ViT-family classifier relreg reads attention from."""
        raise ValueError(
            f"Expected a ViT-family transformers classifier (model_type one of {SUPPORTED}) "
            f"for the attention explainers, but got model_type {self.model_type!r} "
            f"({type(self.model).__name__}): its attention is not one sequence of patch tokens "
            f"relreg can read (e.g. Swin's shifted windows). Explainers that work on it: "
            f"{GRADIENT_EXPLAINERS}."
        )


class HuggingFaceViT(HuggingFaceClassifier):
    """A ``transformers`` ViT / DeiT / BEiT classifier laid out like a timm ViT for the explainers.

    Attributes:
        num_prefix_tokens: tokens before the patch tokens (1, or 2 with DeiT's distillation token).
        global_pool: ``"token"`` (the CLS row is read out, as in the papers; for DeiT with its
            distillation head, only the CLS token's route is explained) or ``"avg"`` (BEiT's mean
            pooling).
        patch_embed: the model's patch embedding (its ``patch_size`` gives the grid); not
            registered as a submodule.

    Example:
        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> config = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2,
        ...                    num_attention_heads=2, intermediate_size=48, num_labels=3)
        >>> from relreg.explain import explain
        >>> explain(ViTForImageClassification(config).eval(), torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 4, 4])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if self.model_type not in SUPPORTED:
            raise ValueError(
                f"Expected a ViT-family transformers classifier (model_type one of {SUPPORTED}), "
                f"but got model_type {self.model_type!r}; wrap it in HuggingFaceClassifier for "
                f"the explainers that work on any classifier ({GRADIENT_EXPLAINERS})."
            )
        base = getattr(model, getattr(model, "base_model_prefix", ""), None)
        embeddings = getattr(base, "embeddings", None)
        embed = getattr(embeddings, "patch_embeddings", None)
        if embed is None or getattr(embed, "patch_size", None) is None:
            raise ValueError(
                f"Expected {type(model).__name__} to have <base>.embeddings.patch_embeddings with "
                "a patch_size (the ViT layout of transformers), but it has none."
            )
        object.__setattr__(self, "patch_embed", _PatchLayout(embed))  # read, not owned
        self.num_prefix_tokens = 1 + int(
            getattr(embeddings, "distillation_token", None) is not None
        )
        pooled = self.model_type in ("beit", "data2vec-vision")
        mean = pooled and bool(getattr(model.config, "use_mean_pooling", False))
        self.global_pool = "avg" if mean else "token"
        self._layers = self._find_layers(base)
        self._sink: Callable[[Tensor], None] | None = None

    def _find_layers(self, base: nn.Module) -> nn.ModuleList:
        depth = int(self.model.config.num_hidden_layers)
        for module in base.modules():
            if isinstance(module, nn.ModuleList) and len(module) == depth:
                return module
        raise ValueError(
            f"Expected {type(self.model).__name__} to hold its {depth} encoder layers in one "
            "ModuleList, but found none."
        )

    def attention_modules(self) -> list[nn.Module]:
        """The encoder layers, one per attention map, in forward order."""
        return list(self._layers)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, K)``; inside :meth:`record_attention` also hands every block's attention
        probabilities ``(B, heads, N, N)`` to the recorder, in forward order."""
        if self._sink is None:
            return self._run(images).logits
        out = self._run(images, output_attentions=True)
        attentions = getattr(out, "attentions", None)
        if attentions is None or len(attentions) != len(self._layers):
            got = "none" if attentions is None else len(attentions)
            raise RuntimeError(
                f"Expected {len(self._layers)} attention maps from {type(self.model).__name__} "
                f"with output_attentions=True under eager attention, but got {got}."
            )
        for a in attentions:
            self._sink(a)
        return out.logits

    def kernel_blocks(self) -> list[nn.Module]:
        """The encoder layers whose attention-kernel calls the chunked engine reads."""
        return list(self._layers)

    @contextmanager
    def kernel_attention(self) -> Iterator[None]:
        """Within the block, the model calls ``F.scaled_dot_product_attention`` (its attention
        implementation set to ``"sdpa"``), for :class:`relreg.explain.capture.KernelCapture`;
        restored on exit, also after an error."""
        before = getattr(self.model.config, "_attn_implementation", None)
        _set_attention(self.model, "sdpa")
        try:
            yield
        finally:
            if before is not None:
                _set_attention(self.model, before)

    @contextmanager
    def record_attention(self, sink: Callable[[Tensor], None]) -> Iterator[None]:
        """Within the block, forward passes hand each attention map to ``sink``.

        The model's attention implementation is set to ``"eager"`` (the fused kernels never form
        the probabilities) and restored on exit, also after an error.
        """
        if self._sink is not None:
            raise RuntimeError("record_attention is not re-entrant: exit it before entering again.")
        config = self.model.config
        before = getattr(config, "_attn_implementation", None)
        _set_attention(self.model, "eager")
        self._sink = sink
        try:
            yield
        finally:
            self._sink = None
            if before is not None and before != "eager":
                _set_attention(self.model, before)


class _PatchLayout:
    """A transformers patch embedding as the explainers read a timm one: ``patch_size``, the
    convolution (``proj``), its parameters, and the grid, rounded down as the convolution does."""

    def __init__(self, embed: nn.Module) -> None:
        self.embed = embed
        size = embed.patch_size
        self.patch_size = (int(size), int(size)) if isinstance(size, int) else tuple(size)
        self.proj = getattr(embed, "projection", None)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.embed.parameters()

    def dynamic_feat_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] // self.patch_size[0], size[1] // self.patch_size[1]


def _set_attention(model: nn.Module, implementation: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(implementation)
    else:  # older transformers: the config field is read at every forward
        model.config._attn_implementation = implementation


def as_explainable(model: nn.Module) -> nn.Module:
    """``model`` itself, or a ``transformers`` model wrapped for the explainers.

    ViT-family models (:data:`SUPPORTED`) become :class:`HuggingFaceViT`, other ``transformers``
    models :class:`HuggingFaceClassifier`; anything else (timm models, wrapped models) is returned
    unchanged.
    """
    if not is_huggingface_model(model):
        return model
    if str(getattr(model.config, "model_type", "")) in SUPPORTED:
        return HuggingFaceViT(model)
    return HuggingFaceClassifier(model)
