"""TokenCut: unsupervised foreground masks from a self-supervised ViT by a normalised cut.

Wang et al., *Self-Supervised Transformers for Unsupervised Object Discovery using Normalized Cut*,
CVPR 2022 (TokenCut), the masks RobustViT's README suggests for data without human masks. Read
from ``unsupervised_saliency_detection/object_discovery.py`` and ``get_saliency.py`` of
YangtaoWANG95/TokenCut (commit ce70ed6):

1. features ``F``: the last block's keys of the patch tokens (prefix tokens dropped), the heads
   concatenated, each token L2-normalised;
2. graph ``W_ij = 1`` where ``F_i . F_j > tau`` (0.2), ``eps`` (1e-5) elsewhere, ``D = diag(W 1)``;
3. the second-smallest generalised eigenvector ``v`` of ``(D - W) v = lambda D v``;
4. bipartition ``v > mean(v)``; the seed is ``argmax |v|`` and its side is the foreground;
5. only the 4-connected component of the foreground that holds the seed is kept.

:func:`normalized_cut` is the functional core (batched: the generalised problem is solved as the
symmetric one ``D^-1/2 (D - W) D^-1/2 y = lambda y``, ``v = D^-1/2 y``, with ``torch.linalg.eigh``
on the whole batch, where TokenCut calls ``scipy.linalg.eigh`` per image); :class:`TokenCut` runs
a timm ViT, reads its keys with :class:`relreg.explain.capture.KernelCapture` and returns masks at
the images' sizes, optionally refined by the bilateral solver (:mod:`relreg.masks.bilateral`).

Where relreg differs: images are resized to one input size (the model's, or ``img_size``) so that
a batch runs as one forward pass, where TokenCut rounds each side of each image to a multiple of
the patch size; the patch mask is then resized back to each image's own size (nearest), as
TokenCut does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relreg.models import (
    build_model,
    lightning_model_args,
    model_data_config,
    model_from_checkpoint,
)
from relreg.validate import check_choice, check_positive_int

__all__ = ["FEATURES", "TokenCut", "normalized_cut", "seed_component"]

FEATURES = ("k", "q", "v")
_DEFAULT_MODEL = "vit_small_patch16_224.dino"


def seed_component(mask: Tensor, seed: Tensor) -> Tensor:
    """The 4-connected component of ``mask`` that contains ``seed``, per sample.

    Args:
        mask: ``(B, h, w)`` bool.
        seed: ``(B,)`` flat index of a cell of each mask (``row * w + col``), inside the mask.

    Returns:
        ``(B, h, w)`` bool, the component (empty where the seed lies outside the mask).
    """
    b, h, w = mask.shape
    region = torch.zeros(b, h * w, dtype=torch.bool, device=mask.device)
    region[torch.arange(b, device=mask.device), seed] = True
    region = region.view(b, 1, h, w) & mask.view(b, 1, h, w)
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device=mask.device)
    inside = mask.view(b, 1, h, w)
    for _ in range(h * w):  # a flood fill grows by at least one cell per step until it stops
        grown = (F.conv2d(region.float(), cross.view(1, 1, 3, 3), padding=1) > 0) & inside
        if torch.equal(grown, region):
            break
        region = grown
    return region.view(b, h, w)


def normalized_cut(
    features: Tensor, grid: tuple[int, int], tau: float = 0.2, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """TokenCut's foreground patches from patch features (steps 2-5 of the module docstring).

    Args:
        features: ``(B, N, C)`` patch features, ``N = h * w`` in row-major order (no prefix
            tokens); they are L2-normalised here.
        grid: ``(h, w)``, the patch grid.
        tau: similarity threshold of the graph's edges.
        eps: weight of the edges below ``tau``.

    Returns:
        ``mask``: ``(B, h, w)`` bool, the seed's connected foreground component;
        ``eigenvector``: ``(B, h, w)`` float64, the second-smallest generalised eigenvector, signed
        so that the foreground is positive.

    Example:
        >>> f = torch.zeros(1, 16, 2); f[0, :, 0] = 1  # background: (1, 0); object: (0, 1)
        >>> f[0, [5, 6, 9, 10]] = torch.tensor([0.0, 1.0])
        >>> normalized_cut(f, (4, 4))[0].int()[0]
        tensor([[0, 0, 0, 0],
                [0, 1, 1, 0],
                [0, 1, 1, 0],
                [0, 0, 0, 0]], dtype=torch.int32)
    """
    if features.dim() != 3:
        raise ValueError(f"Expected features of shape (B, N, C), but got {tuple(features.shape)}.")
    h, w = grid
    if features.shape[1] != h * w:
        raise ValueError(
            f"Expected features with grid[0] * grid[1] = {h * w} tokens, but got "
            f"{features.shape[1]} (features of shape {tuple(features.shape)}, grid {grid})."
        )
    f = F.normalize(features.double(), dim=-1)
    similarity = f @ f.transpose(1, 2)
    weights = torch.where(similarity > tau, 1.0, eps).to(similarity)
    degree = weights.sum(-1)
    scale = degree.rsqrt()
    laplacian = torch.diag_embed(degree) - weights
    symmetric = scale[:, :, None] * laplacian * scale[:, None, :]
    _, vectors = torch.linalg.eigh(symmetric)
    v = scale * vectors[:, :, 1]
    foreground = v > v.mean(-1, keepdim=True)
    seed = v.abs().argmax(-1)
    flip = ~foreground.gather(1, seed[:, None]).squeeze(1)
    foreground = torch.where(flip[:, None], ~foreground, foreground)
    v = torch.where(flip[:, None], -v, v)
    mask = seed_component(foreground.view(-1, h, w), seed)
    return mask, v.view(-1, h, w)


def _load(
    model: nn.Module | str, pretrained: bool, checkpoint: str | os.PathLike | None
) -> nn.Module:
    if checkpoint is not None and lightning_model_args(checkpoint) is not None:
        return model_from_checkpoint(checkpoint)
    if isinstance(model, str):
        return build_model(model, pretrained=pretrained, checkpoint=checkpoint, num_classes=0)
    if not isinstance(model, nn.Module) or not hasattr(model, "patch_embed"):
        raise TypeError(
            f"Expected model to be a timm ViT (with patch_embed and blocks) or a timm model name, "
            f"but got {type(model).__name__}."
        )
    return model


class TokenCut:
    """TokenCut masks of images from a timm ViT's last-block keys (see the module docstring).

    Args:
        model: a timm ViT, or a timm model name (default ``"vit_small_patch16_224.dino"``, the
            DINO ViT-S/16 TokenCut uses), created with ``pretrained``.
        pretrained: load timm's weights for a model given by name (needs the network or the
            Hugging Face cache).
        checkpoint: a local weights file for the model given by name, or a ``relreg fit``
            checkpoint (which names its own architecture; ``model`` is then ignored).
        tau, eps: the graph's threshold and small weight (TokenCut: 0.2, 1e-5).
        features: which of the last block's kernel inputs: ``"k"`` (TokenCut's default), ``"q"``
            or ``"v"``.
        block: which block's kernel inputs (TokenCut: the last, ``-1``; Python indexing).
        refine: apply the bilateral solver to each mask at the image's size
            (:func:`relreg.masks.bilateral.bilateral_refine`; needs SciPy, the ``masks`` extra);
            a dict sets the solver's options (``{"sigma_spatial": 4.0}`` for small images).
        img_size: the size images are resized to, ``S`` or ``(H, W)`` (default: the model's input
            size; another size needs a model built with ``dynamic_img_size=True``).
        device: where the model runs (default: the model's device).

    Call it with a list of ``(3, H_i, W_i)`` uint8 images; it returns a list of ``(H_i, W_i)`` bool
    masks.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> masks = TokenCut(vit)([torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)])
        >>> masks[0].shape, masks[0].dtype
        (torch.Size([40, 30]), torch.bool)
    """

    def __init__(
        self,
        model: nn.Module | str = _DEFAULT_MODEL,
        *,
        pretrained: bool = True,
        checkpoint: str | os.PathLike | None = None,
        tau: float = 0.2,
        eps: float = 1e-5,
        features: str = "k",
        block: int = -1,
        refine: bool | dict = False,
        img_size: int | tuple[int, int] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        check_choice("features", features, FEATURES)
        if not isinstance(tau, (int, float)) or not -1.0 <= tau < 1.0:
            raise ValueError(f"Expected tau to be a cosine similarity in [-1, 1), but got {tau!r}.")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"Expected eps > 0, but got {eps!r}.")
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        if img_size is not None:
            if not isinstance(img_size, (tuple, list)) or len(img_size) != 2:
                raise ValueError(f"Expected img_size to be S or (H, W), but got {img_size!r}.")
            for side in img_size:
                check_positive_int("img_size", side)
        self.model = _load(model, pretrained, checkpoint).eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        depth = len(getattr(self.model, "blocks", []))
        if isinstance(block, bool) or not isinstance(block, int) or not -depth <= block < depth:
            raise ValueError(
                f"Expected block to index the model's {depth} blocks, but got {block!r}."
            )
        if not isinstance(refine, (bool, dict)):
            raise TypeError(f"Expected refine to be a bool or a dict, but got {refine!r}.")
        self.tau, self.eps, self.features, self.refine = float(tau), float(eps), features, refine
        self.block = block % depth
        native, mean, std = model_data_config(self.model)
        self.img_size = tuple(img_size or native)
        if self.img_size != tuple(native) and not getattr(self.model, "dynamic_img_size", False):
            raise ValueError(
                f"Expected img_size {tuple(native)} (the model's input size) for a model built "
                f"without dynamic_img_size=True, but got {self.img_size}."
            )
        patch = self.model.patch_embed.patch_size
        self.patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if self.img_size[0] % self.patch[0] or self.img_size[1] % self.patch[1]:
            raise ValueError(
                f"Expected img_size to be a multiple of the patch size {self.patch}, but got "
                f"{self.img_size}."
            )
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def _inputs(self, images: Sequence[Tensor]) -> Tensor:
        size = self.img_size
        x = torch.stack(
            [
                F.interpolate(
                    im[None].float().to(self.device) / 255, size, mode="bilinear", antialias=True
                )[0]
                for im in images
            ]
        )
        return (x - self.mean) / self.std

    def patch_masks(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The masks on the patch grid.

        Args:
            images: ``B`` uint8 images ``(3, H_i, W_i)``.

        Returns:
            ``(B, h, w)`` bool masks and ``(B, h, w)`` eigenvectors (see :func:`normalized_cut`).
        """
        return self.cut(self._inputs(images))

    @torch.no_grad()
    def cut(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The masks on the patch grid of model-ready inputs.

        Args:
            x: ``(B, 3, H, W)``, normalised as the model expects, ``(H, W) = img_size``.

        Returns:
            ``(B, h, w)`` bool masks and ``(B, h, w)`` eigenvectors (see :func:`normalized_cut`).
        """
        from relreg.explain.capture import KernelCapture

        if x.dim() != 4 or tuple(x.shape[1:]) != (3, *self.img_size):
            raise ValueError(
                f"Expected x of shape (B, 3, {self.img_size[0]}, {self.img_size[1]}), but got "
                f"{tuple(x.shape)}."
            )
        with KernelCapture(self.model) as capture:
            self.model.forward_features(x.to(self.device))
        last = [c for c in capture.calls if c.block == self.block]
        if not last:
            raise ValueError(
                f"Expected block {self.block} of {type(self.model).__name__} to call "
                "F.scaled_dot_product_attention, but it made no call there."
            )
        tokens = getattr(last[-1], self.features)  # (B, heads, N, head_dim)
        b, _, n, _ = tokens.shape
        tokens = tokens.transpose(1, 2).reshape(b, n, -1)
        grid = (self.img_size[0] // self.patch[0], self.img_size[1] // self.patch[1])
        prefix = n - grid[0] * grid[1]
        return normalized_cut(tokens[:, prefix:], grid, self.tau, self.eps)

    def __call__(
        self, images: Sequence[Tensor], prompts: Sequence[str] | None = None
    ) -> list[Tensor]:
        """Masks at each image's size: a list of ``(H_i, W_i)`` bool tensors (``prompts`` are
        ignored: TokenCut needs no text)."""
        masks, _ = self.patch_masks(images)
        out = []
        for image, mask in zip(images, masks, strict=True):
            full = F.interpolate(mask[None, None].float(), image.shape[-2:], mode="nearest")[0, 0]
            full = full.bool().cpu()
            if self.refine:
                from relreg.masks.bilateral import bilateral_refine

                options = self.refine if isinstance(self.refine, dict) else {}
                full = bilateral_refine(image, full, **options)
            out.append(full)
        return out
