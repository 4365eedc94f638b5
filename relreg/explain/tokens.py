"""Token layout of timm ViTs: prefix tokens, the patch grid, the read-out row, and pixel maps.

timm ViTs put ``num_prefix_tokens`` tokens (CLS, DeiT's distillation token, register tokens)
before the patch tokens. Relevance maps keep only the patch columns and reshape them to the
patch grid, which follows the image size (any ``img_size`` / ``patch_size``, non-square grids,
``dynamic_img_size``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "min_max",
    "num_prefix_tokens",
    "patch_grid",
    "sum_to_patches",
    "pool_readout",
    "readout_weights",
    "to_pixels",
]


def num_prefix_tokens(model: nn.Module) -> int:
    """Number of tokens before the patch tokens (CLS, distillation and register tokens)."""
    n = getattr(model, "num_prefix_tokens", None)
    if n is None:
        n = int(getattr(model, "cls_token", None) is not None)
    return int(n)


def patch_grid(model: nn.Module, image_size: tuple[int, int], num_patches: int) -> tuple[int, int]:
    """Patch grid ``(gh, gw)`` of ``model`` for images of ``image_size`` ``(H, W)``.

    Args:
        model: a timm ViT with a ``patch_embed`` module.
        image_size: input height and width in pixels.
        num_patches: number of patch tokens seen in the attention maps, used as a check.

    Raises:
        ValueError: if the grid does not account for ``num_patches`` tokens.
    """
    embed = getattr(model, "patch_embed", None)
    size = tuple(int(s) for s in image_size)
    if embed is not None and hasattr(embed, "dynamic_feat_size"):
        grid = tuple(int(g) for g in embed.dynamic_feat_size(size))
    elif embed is not None and hasattr(embed, "patch_size"):
        ph, pw = _pair(embed.patch_size)
        grid = (-(-size[0] // ph), -(-size[1] // pw))
    else:
        side = int(round(num_patches**0.5))
        grid = (side, side)
    if grid[0] * grid[1] != num_patches:
        raise ValueError(
            f"Expected {num_patches} patch tokens to form the patch grid of a {size[0]}x{size[1]} "
            f"image, but the grid is {grid[0]}x{grid[1]} = {grid[0] * grid[1]}."
        )
    return grid  # type: ignore[return-value]


def readout_weights(
    model: nn.Module, num_tokens: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Row vector ``(N,)`` that reads the classifier's input out of the token sequence.

    ``global_pool="token"`` (CLS models, the papers' setting) reads row 0; ``"avg"`` averages the
    patch tokens, so the relevance of an average-pooled model is the mean of the patch rows.
    Attention pooling (``"map"``) is not a fixed mix: see :func:`pool_readout`.

    Raises:
        ValueError: for pooling modes whose read-out is not a fixed token mix (e.g. ``"map"``).
    """
    pool = getattr(model, "global_pool", "token")
    prefix = num_prefix_tokens(model)
    w = torch.zeros(num_tokens, device=device, dtype=dtype)
    if pool == "token" and prefix > 0:
        w[0] = 1.0
    elif pool == "avg":
        w[prefix:] = 1.0 / (num_tokens - prefix)
    else:
        raise ValueError(
            f"Expected a model with global_pool 'token' (and a class token) or 'avg', but got "
            f"global_pool={pool!r} with {prefix} prefix tokens; the relevance of other read-outs "
            "(e.g. attention pooling 'map') is not a fixed token mix: the attention "
            "explainers read it from the pool's attention (pool_readout)."
        )
    return w


def pool_readout(
    pool: Tensor,
    grad: Tensor | None,
    rule: str,
    num_tokens: int,
    constant_grad: bool = True,
) -> Tensor:
    """The read-out row ``(B, N)`` of an attention-pool model (``global_pool="map"``: timm's
    ``AttentionPoolLatent``; SigLIP, SigLIP 2, PE).

    The pool's latent queries attend over the tokens, and the pooled vector is all the head sees,
    so the pool's own (gradient-weighted) attention takes the place of the CLS row:
    ``r = mean_{h, l} W(A_pool)[h, l, :]`` over heads ``h`` and latent queries ``l``, with ``W``
    the rule the blocks use (``"attention"``: ``A``; ``"chefer"``: ``clamp(dy/dA * A, min=0)``;
    ``"chefer_logits"``: ``clamp((dy/dA - sum_k A_k dy/dA_k) * A, min=0)``). The pool has no
    residual path from the tokens, so no identity is added.

    Args:
        pool: ``(B, heads, L, N)`` the pool's attention probabilities.
        grad: ``(B, heads, L, N)`` their gradient ``dy/dA`` (a constant; None for
            ``"attention"``).
        rule: ``"attention"``, ``"chefer"`` or ``"chefer_logits"``.
        num_tokens: ``N``, the blocks' sequence length; a pool over the patch tokens only
            (``N_pool = N - prefix``, timm's ViT with a class token) gives the prefix columns 0.
        constant_grad: hold ``grad`` constant (first order); False differentiates through it
            too (second order).

    Returns:
        ``(B, N)``, differentiable through ``pool``.
    """
    if rule == "attention":
        return _pad_front(pool.mean(dim=(1, 2)), num_tokens)
    if grad is None:
        raise ValueError(f"Expected the pool's attention gradient for rule {rule!r}, but got None.")
    g = grad.detach() if constant_grad else grad
    if rule == "chefer_logits":
        a = pool.detach() if constant_grad else pool
        g = g - (a * g).sum(dim=-1, keepdim=True)
    return _pad_front((g * pool).clamp(min=0).mean(dim=(1, 2)), num_tokens)


def _pad_front(row: Tensor, num_tokens: int) -> Tensor:
    """``row (B, n)`` as ``(B, num_tokens)``, zeros before it (the tokens the pool did not see)."""
    missing = num_tokens - row.shape[-1]
    if missing < 0:
        raise ValueError(
            f"Expected the attention pool to attend over at most the {num_tokens} tokens of the "
            f"blocks, but it attends over {row.shape[-1]}."
        )
    return F.pad(row, (missing, 0)) if missing else row


def _readout(model: nn.Module, relevance: Tensor) -> Tensor:
    """Read-out row ``(B, N)`` of :func:`readout_weights` for square maps ``(B, ..., N, N)``.

    Args:
        model: the timm ViT the maps come from.
        relevance: attention or relevance maps ``(B, h, N, N)`` or ``(B, N, N)``.

    Returns:
        The read-out weights, expanded to ``(B, N)`` in ``relevance``'s device and dtype.
    """
    b = relevance.shape[0]
    n = relevance.shape[-1]
    return readout_weights(model, n, relevance.device, relevance.dtype).expand(b, n)


def _to_grid(model: nn.Module, images: Tensor, row: Tensor) -> Tensor:
    """Patch columns of read-out rows ``(B, N)`` as maps ``(B, gh, gw)``."""
    return _patches_to_grid(model, images, row[:, num_prefix_tokens(model) :])


def _patches_to_grid(model: nn.Module, images: Tensor, patches: Tensor) -> Tensor:
    """Patch-token values ``(B, P)`` as maps ``(B, gh, gw)`` for ``images`` ``(B, C, H, W)``."""
    gh, gw = patch_grid(model, images.shape[-2:], patches.shape[1])
    return patches.reshape(patches.shape[0], gh, gw)


def min_max(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-image min-max normalisation of ``maps`` ``(B, ...)`` to [0, 1]; constant maps give 0."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)


def to_pixels(
    maps: Tensor, size: tuple[int, int] | torch.Size, normalize: bool = True, eps: float = 1e-8
) -> Tensor:
    """Turn patch-grid or pixel maps into pixel maps.

    Bilinear upsampling (``align_corners=False``, as in RobustViT and the perturbation test),
    then, when ``normalize``, per-image min-max with ``eps`` so that a constant map gives zeros.
    Differentiable.

    Args:
        maps: ``(B, h, w)`` relevance on the patch grid or ``(B, H, W)`` on pixels.
        size: output ``(H, W)``, e.g. ``images.shape[-2:]``.
        normalize: min-max normalise each map to [0, 1].
        eps: floor of the (max - min) denominator.

    Returns:
        ``(B, H, W)`` maps.

    Example:
        >>> import torch
        >>> to_pixels(torch.rand(2, 14, 14), size=(224, 224)).shape
        torch.Size([2, 224, 224])
    """
    if not isinstance(maps, Tensor):
        raise TypeError(f"Expected maps to be a torch.Tensor, but got {type(maps).__name__}.")
    if maps.ndim != 3:
        raise ValueError(f"Expected maps of shape (B, h, w), but got shape {tuple(maps.shape)}.")
    size = (int(size[0]), int(size[1]))
    out = maps
    if tuple(maps.shape[-2:]) != size:
        work = maps if maps.is_floating_point() else maps.float()
        out = F.interpolate(work.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[
            :, 0
        ]
    return min_max(out, eps) if normalize else out


def _pair(x: int | tuple[int, ...]) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


def sum_to_patches(maps: Tensor, patch_size: int | tuple[int, int]) -> Tensor:
    """Sum pixel relevance over each patch: ``(B, H, W)`` to ``(B, H / ph, W / pw)``.

    Relevance is additive, so a patch's relevance is the sum of its pixels' (the total is kept).
    Differentiable.

    Args:
        maps: ``(B, H, W)`` pixel maps (e.g. ``attnlrp``'s).
        patch_size: ``p`` or ``(ph, pw)``, dividing ``H`` and ``W``.

    Returns:
        ``(B, gh, gw)`` patch-grid maps.

    Example:
        >>> sum_to_patches(torch.ones(1, 32, 32), 16)
        tensor([[[256., 256.],
                 [256., 256.]]])
    """
    if not isinstance(maps, Tensor):
        raise TypeError(f"Expected maps to be a torch.Tensor, but got {type(maps).__name__}.")
    ph, pw = _pair(patch_size)
    if maps.ndim != 3 or ph < 1 or pw < 1 or maps.shape[1] % ph or maps.shape[2] % pw:
        raise ValueError(
            f"Expected maps of shape (B, H, W) with H divisible by {ph} and W by {pw}, but got "
            f"shape {tuple(maps.shape)}."
        )
    b, h, w = maps.shape
    return maps.reshape(b, h // ph, ph, w // pw, pw).sum(dim=(2, 4))
