"""Build a timm model from a name, with timm weights or a local checkpoint, never running its code.

Checkpoints are read with timm's loader with ``weights_only=True`` (plain ``state_dict`` files,
``.safetensors``, timm training checkpoints, and Lightning checkpoints whose ``state_dict`` keys
carry a module prefix such as ``model.``).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from torch import nn

__all__ = [
    "build_model",
    "check_same_preprocessing",
    "freeze_parameters",
    "lightning_model_args",
    "load_weights",
    "model_data_config",
    "model_from_checkpoint",
    "timm_state_from_torchvision_vit",
]


def build_model(
    name: str,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    grad_checkpointing: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model by name, optionally with pretrained or local weights.

    Args:
        name: a timm model name, e.g. ``"vit_base_patch16_224"``.
        pretrained: download timm's weights (needs the network or a filled Hugging Face cache).
        checkpoint: a local weights file, loaded after creation (overrides ``pretrained``).
        num_classes: classifier size; None keeps the model's default.
        grad_checkpointing: switch on timm's gradient checkpointing of the blocks
            (``model.set_grad_checkpointing()``, non-reentrant); from a fit config:
            ``model.model_kwargs: {grad_checkpointing: true}``.
        **kwargs: passed to ``timm.create_model`` (``img_size``, ``patch_size``, ...).

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: unknown model name, or a checkpoint that does not fit the model.
        FileNotFoundError: a missing checkpoint file.
        RuntimeError: pretrained weights could not be fetched (offline); says how to pass a file.

    Example:
        >>> model = build_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8)
        >>> model.num_classes
        3
    """
    if not isinstance(grad_checkpointing, bool):
        raise TypeError(
            "Expected grad_checkpointing to be a bool, but got "
            f"{type(grad_checkpointing).__name__}."
        )
    if not isinstance(name, str) or not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5] if isinstance(name, str) else []
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ValueError(f"Expected a timm model name, but got {name!r}.{hint}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    use_hub = pretrained and checkpoint is None
    try:
        model = timm.create_model(name, pretrained=use_hub, **kwargs)
    except Exception as err:  # network and hub errors come in many types
        if not use_hub:
            raise
        raise RuntimeError(
            f"Could not fetch pretrained weights for {name!r} ({type(err).__name__}: {err}). "
            "Without network access, pass a local weights file instead: --checkpoint PATH "
            "(Python: checkpoint=PATH), e.g. a file saved with "
            "torch.save(model.state_dict(), PATH) or a .safetensors file from the model's "
            "Hugging Face page. Offline, set HF_HUB_OFFLINE=1 to fail at once instead of retrying."
        ) from err
    if checkpoint is not None:
        load_weights(model, checkpoint)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.eval()


def load_weights(model: nn.Module, checkpoint: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a local weights file into ``model`` (``weights_only=True``; never executes code).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a weights file, or holds weights of another architecture or
            another number of classes.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"Expected a checkpoint file, but {str(path)!r} does not exist.")
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors come in many types
        raise ValueError(
            f"Expected a weights file (state_dict, .safetensors or Lightning checkpoint), but "
            f"could not read {str(path)!r}: {type(err).__name__}: {err}"
        ) from err
    state = _strip_module_prefix(state, set(model.state_dict()))
    _check_fits(model, state, path, strict)  # torch would copy the fitting tensors, then raise
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise ValueError(
            f"Checkpoint {str(path)!r} does not fit {type(model).__name__} "
            f"(another architecture or another num_classes?): {err}"
        ) from err
    return model


def _check_fits(model: nn.Module, state: dict[str, Any], path: Path, strict: bool) -> None:
    """Raise before loading when ``state`` does not fit ``model``, so the model stays unchanged."""
    own = model.state_dict()
    theirs = {k: tuple(getattr(state[k], "shape", ())) for k in own.keys() & state.keys()}
    shapes = [
        f"{k}: checkpoint {theirs[k]}, model {tuple(own[k].shape)}"
        for k in sorted(theirs)
        if theirs[k] != tuple(own[k].shape)
    ]
    missing = sorted(own.keys() - state.keys()) if strict else []
    unexpected = sorted(state.keys() - own.keys()) if strict else []
    problems = [
        f"{len(found)} {what}, e.g. {found[:3]}"
        for what, found in (
            ("shape mismatches", shapes),
            ("keys missing from the checkpoint", missing),
            ("unexpected keys", unexpected),
        )
        if found
    ]
    if problems:
        raise ValueError(
            f"Checkpoint {str(path)!r} does not fit {type(model).__name__} (another architecture "
            f"or another num_classes?): {'; '.join(problems)}."
        )


def _strip_module_prefix(
    state: dict[str, torch.Tensor], wanted: set[str]
) -> dict[str, torch.Tensor]:
    """Drop a Lightning-style prefix (``model.``) when that makes the keys match the model's."""
    if set(state) & wanted:
        return state
    for prefix in sorted({k.split(".", 1)[0] + "." for k in state if "." in k}):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if set(stripped) & wanted:
            return stripped
    return state


def lightning_model_args(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The timm model a :class:`relreg.lightning.RelRegModule` checkpoint was trained with.

    Reads the checkpoint's ``hyper_parameters`` (``weights_only=True``) and returns
    ``{"name", "num_classes", **model_kwargs}`` ready for :func:`build_model`, or None for a file
    that is not such a checkpoint (a plain ``state_dict``, a ``.safetensors`` file, a module
    built from an ``nn.Module`` rather than a timm name).

    Raises:
        FileNotFoundError: the file does not exist.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"Expected a checkpoint file, but {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, or one that needs code to load: not ours
        return None
    hparams = state.get("hyper_parameters") if isinstance(state, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model"), str):
        return None
    return {
        "name": hparams["model"],
        "num_classes": hparams.get("num_classes"),
        **dict(hparams.get("model_kwargs") or {}),
    }


def model_from_checkpoint(checkpoint: str | os.PathLike) -> nn.Module:
    """The model of a ``relreg fit`` checkpoint, built from the architecture it stores
    (:func:`lightning_model_args`) with its weights, in eval mode.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a file that is not a relreg fit checkpoint (plain weights need
            :func:`build_model` with the architecture).
    """
    spec = lightning_model_args(checkpoint)
    if spec is None:
        raise ValueError(
            "Expected a relreg fit checkpoint that names its architecture, "
            f"but {str(checkpoint)!r} is not one; use build_model(name, checkpoint=...) for plain "
            "weights."
        )
    name = spec.pop("name")
    num_classes = spec.pop("num_classes")
    return build_model(name, checkpoint=checkpoint, num_classes=num_classes, **spec).eval()


def model_data_config(model: nn.Module) -> tuple[tuple[int, int], list, list]:
    """``(input size (H, W), mean, std)`` of a timm model (its own ``patch_embed.img_size``)."""
    config = timm.data.resolve_model_data_config(model)
    size = (
        getattr(getattr(model, "patch_embed", None), "img_size", None) or config["input_size"][1:]
    )
    return tuple(int(s) for s in size), list(config["mean"]), list(config["std"])


def check_same_preprocessing(models: dict[str, nn.Module]) -> None:
    """Raise unless every model takes the same input (size, mean, std, crop): data and heatmap
    images are then loaded once for all of them (``relreg evaluate``).

    Raises:
        ValueError: naming each model's data config.
    """
    configs = {label: model_data_config(m) for label, m in models.items()}
    if len({repr(c) for c in configs.values()}) > 1:
        raise ValueError(
            "Expected checkpoints with the same input size, mean and std, but got "
            + "; ".join(f"{label}: {c}" for label, c in configs.items())
            + ". Evaluate them in separate runs."
        )


def freeze_parameters(model: nn.Module, patterns: Sequence[str]) -> None:
    """Set ``requires_grad=False`` on the parameters whose names match any ``fnmatch`` pattern.

    Raises:
        TypeError: ``patterns`` is a string, not a list of them.
        ValueError: a pattern matches no parameter (nothing is frozen then).
    """
    if isinstance(patterns, str):
        raise TypeError(f"Expected freeze a list of patterns, but got the string {patterns!r}.")
    names = [n for n, _ in model.named_parameters()]
    hits = set()
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"Freeze pattern {pattern!r} matches no parameter; e.g. {names[:3]}.")
        hits.update(matched)
    for name, p in model.named_parameters():
        if name in hits:
            p.requires_grad_(False)


_TORCHVISION_VIT_LAYER_NAMES = {
    "ln_1": "norm1",
    "self_attention.in_proj_": "attn.qkv.",
    "self_attention.out_proj.": "attn.proj.",
    "ln_2": "norm2",
    "mlp.0.": "mlp.fc1.",
    "mlp.3.": "mlp.fc2.",
}


def timm_state_from_torchvision_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ``VisionTransformer`` state dict under timm's ``VisionTransformer`` names.

    The two models compute the same function once the names are mapped: the same ``[q; k; v]``
    order in the fused input projection, GELU, LayerNorm with eps ``1e-6``, a class token and a
    learned position embedding. Build the timm model with the same sizes, e.g. torchvision's
    ``vit_b_16`` as ``timm.create_model("vit_base_patch16_224")``; the tensors are shared, not
    copied. LXT's ViT example and the parity test of AttnLRP run on torchvision's model.

    Raises:
        ValueError: ``state`` has none of torchvision's ViT keys.
    """
    if "conv_proj.weight" not in state or "encoder.ln.weight" not in state:
        raise ValueError(
            "Expected a torchvision VisionTransformer state dict (keys 'conv_proj.weight', "
            f"'encoder.ln.weight', ...), but got keys {sorted(state)[:4]}."
        )
    heads = {k: v for k, v in state.items() if k.startswith("heads.")}
    if heads and set(heads) != {"heads.head.weight", "heads.head.bias"}:
        raise ValueError(
            "Expected torchvision's single-layer head ('heads.head.*'), but got "
            f"{sorted(heads)} (a pre-logits layer has no timm counterpart here)."
        )
    out = {
        "cls_token": state["class_token"],
        "pos_embed": state["encoder.pos_embedding"],
        "patch_embed.proj.weight": state["conv_proj.weight"],
        "patch_embed.proj.bias": state["conv_proj.bias"],
        "norm.weight": state["encoder.ln.weight"],
        "norm.bias": state["encoder.ln.bias"],
    }
    if heads:
        out["head.weight"], out["head.bias"] = heads["heads.head.weight"], heads["heads.head.bias"]
    prefix = "encoder.layers.encoder_layer_"
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        index, rest = key.removeprefix(prefix).split(".", 1)
        for theirs, ours in _TORCHVISION_VIT_LAYER_NAMES.items():
            if rest.startswith(theirs):
                out[f"blocks.{index}.{ours}{rest.removeprefix(theirs)}"] = value
    return out
