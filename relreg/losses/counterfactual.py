"""Background counterfactuals: the prediction must not change when only the background does.

A loss that acts on what the prediction reads rather than on where a relevance map points. With the
foreground masks that relevance fine-tuning already needs, each masked image gets the background
of another image of the batch (:func:`swap_backgrounds`), and :func:`counterfactual_loss` asks the
model to predict on it what it predicts on the original: ``KL(p(x) || p(x_cf))`` with ``p(x)`` held
fixed. A cue in the background (a tint, a corner marker, a scene) then stops paying, whatever a
relevance map says about it. It is the consistency form of background augmentation (Xiao et al.,
"Noise or Signal: The Role of Image Backgrounds in Object Recognition", ICLR 2021, which mixes
foregrounds and backgrounds as training data) and of counterfactual consistency losses in general;
relreg's robustness study (``experiments/robustness_study.py``) compares it with RobustViT
(Chefer, Schwartz & Wolf, NeurIPS 2022), the relevance-mass loss and RRR.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["swap_backgrounds", "counterfactual_loss"]


def swap_backgrounds(images: Tensor, masks: Tensor, shift: int = 1) -> Tensor:
    """Each image's foreground on the background of the image ``shift`` places along the batch.

    Where the other image has its own foreground (and this one has background), that other
    image's mean background colour fills in, so no second object appears.

    Args:
        images: ``(B, C, H, W)`` images (any normalisation).
        masks: ``(B, H, W)`` foreground masks in [0, 1] at the images' resolution.
        shift: which image lends its background: image ``(i - shift) mod B`` to image ``i``.

    Returns:
        ``(B, C, H, W)`` counterfactual images; with ``B == 1`` (or ``shift % B == 0``) the input.

    Example:
        >>> import torch
        >>> x = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
        >>> m = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
        >>> swap_backgrounds(x, m)[0, 0]
        tensor([[0., 1.],
                [1., 1.]])
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"Expected images of shape (B, C, H, W), but got {got}.")
    if not isinstance(masks, Tensor) or masks.shape != (images.shape[0], *images.shape[-2:]):
        got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(
            f"Expected masks of shape {(images.shape[0], *images.shape[-2:])}, but got {got}; "
            "resize masks to the images with nearest-neighbour interpolation first."
        )
    if not ((masks >= 0) & (masks <= 1)).all():
        raise ValueError("Expected mask values in [0, 1]; divide 0/255 masks by 255.")
    m = masks.to(images.dtype).unsqueeze(1)
    other = images.roll(shift, 0)
    other_m = m.roll(shift, 0)
    bg = 1 - other_m
    fill = (other * bg).sum((-2, -1), keepdim=True) / bg.sum((-2, -1), keepdim=True).clamp_min(1)
    background = other * bg + fill * other_m
    return m * images + (1 - m) * background


def counterfactual_loss(logits: Tensor, counterfactual_logits: Tensor) -> Tensor:
    """``KL(softmax(logits) || softmax(counterfactual_logits))``, the first held fixed.

    Args:
        logits: ``(B, K)`` the model's logits on the images (the target; not differentiated).
        counterfactual_logits: ``(B, K)`` its logits on their background counterfactuals.

    Returns:
        A scalar tensor (mean over the batch); 0 when the predictions agree.

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> counterfactual_loss(z, z).item()
        0.0
    """
    for name, t in (("logits", logits), ("counterfactual_logits", counterfactual_logits)):
        if not isinstance(t, Tensor) or t.ndim != 2:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"Expected {name} of shape (B, K), but got {got}.")
    if counterfactual_logits.shape != logits.shape:
        raise ValueError(
            f"Expected counterfactual_logits of the logits' shape {tuple(logits.shape)}, "
            f"but got {tuple(counterfactual_logits.shape)}."
        )
    target = F.log_softmax(logits.detach(), dim=1)
    return F.kl_div(
        F.log_softmax(counterfactual_logits, dim=1), target, reduction="batchmean", log_target=True
    )
