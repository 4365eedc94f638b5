"""A faithfulness anchor: the background may not matter more to the decision than the map says.

relreg's robustness study found that a loss on *where relevance points* (RobustViT, Chefer,
Schwartz & Wolf, NeurIPS 2022; the relevance-mass loss) can be met by moving the map while the
decision keeps reading a background cue: the map stops being faithful during fine-tuning. The
anchor closes that door by tying the map to a measurement of the decision. Per masked image ``x``
with foreground mask ``m`` and target class ``t``:

- the map's background share ``s = sum(R (1 - m)) / sum(R)`` (``R`` the non-negative pixel map the
  relevance loss sees);
- the background's measured effect share ``e = d_bg / (d_bg + d_fg)`` with
  ``d_bg = |log p_t(x) - log p_t(x_bg)|`` (``x_bg``: the object on another image's background,
  :func:`relreg.losses.swap_backgrounds`) and ``d_fg = |log p_t(x) - log p_t(x_fg)|`` (``x_fg``: the
  object's pixels replaced by the image's mean background colour), an occlusion test with two
  regions (Zeiler & Fergus, ECCV 2014; the region-swap form of Xiao et al., ICLR 2021);
- the loss ``mean relu(e - s)^2``: the background may not matter more to the decision than the map
  says (``symmetric=True``: ``mean (s - e)^2``). By default (``train="decision"``) the map's share
  is the target (detached) and the decision is pulled under it: the relevance loss sets where the
  map points, and the anchor makes the prediction follow. ``train="both"`` also pulls the map to
  the decision (a faithfulness regulariser); ``train="map"`` only that. One-sided, because a
  map's share has a floor (relevance spread over the many background patches) that the decision
  should not be pushed up to: on the study's tint benchmark the symmetric, decision-trained form
  raised the background's effect and lost OOD accuracy. The object's effect ``d_fg`` is held
  fixed (detached): otherwise the decision can meet the anchor by making its prediction on the
  object-occluded image extreme instead of reading the background less.

Together with a relevance loss that pushes ``s`` down, the only way to lower both terms is to lower
the background's real effect (or raise the object's): moving the map alone now costs. Two more
forward passes over the masked images per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relreg.losses.counterfactual import swap_backgrounds

__all__ = ["background_effect_share", "faithfulness_loss", "occlude_foreground"]


def occlude_foreground(images: Tensor, masks: Tensor) -> Tensor:
    """The images with their foreground replaced by each image's mean background colour.

    Args:
        images: ``(B, C, H, W)``.
        masks: ``(B, H, W)`` foreground masks in [0, 1].

    Returns:
        ``(B, C, H, W)``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])
        >>> occlude_foreground(x, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
        tensor([[[[5., 3.],
                  [5., 7.]]]])
    """
    m = masks.to(images.dtype).unsqueeze(1)
    bg = 1 - m
    fill = (images * bg).sum((-2, -1), keepdim=True) / bg.sum((-2, -1), keepdim=True).clamp_min(1)
    return images * bg + fill * m


def background_effect_share(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    target: Tensor,
    logits: Tensor,
    eps: float = 1e-6,
) -> Tensor:
    """Per image, the background's share of the measured effect on ``log p_target``.

    ``d_bg / (d_bg + d_fg)`` (see the module docstring), in the autograd graph of ``model``; 0.5
    when neither swap moves the prediction.

    Args:
        model: the classifier, ``images -> logits``.
        images: ``(B, C, H, W)`` masked images, ``B >= 2`` (backgrounds come from the batch).
        masks: ``(B, H, W)`` foreground masks at the images' resolution.
        target: ``(B,)`` classes.
        logits: ``(B, K)`` the model's logits on ``images`` (from the training step's forward).
        eps: keeps the share defined when both effects vanish.

    Returns:
        ``(B,)`` shares in [0, 1].
    """
    if images.shape[0] < 2:
        raise ValueError(
            f"Expected at least 2 masked images (backgrounds are swapped within the batch), "
            f"but got {images.shape[0]}."
        )
    swapped = torch.cat([swap_backgrounds(images, masks), occlude_foreground(images, masks)])
    logp = F.log_softmax(model(swapped), dim=1).unflatten(0, (2, images.shape[0]))
    idx = target.view(1, -1, 1).expand(2, -1, 1)
    clean = F.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
    d_bg, d_fg = (clean - logp.gather(2, idx)[..., 0]).abs()
    d_fg = d_fg.detach()  # the decision may lower the background's effect, not game the object's
    return (d_bg + eps / 2) / (d_bg + d_fg + eps)


TRAIN = ("decision", "both", "map")


def faithfulness_loss(
    pixels: Tensor,
    masks: Tensor,
    effect_share: Tensor,
    train: str = "decision",
    symmetric: bool = False,
) -> Tensor:
    """``mean_b relu(e_b - s_b)^2``: the measured background effect share above the map's share.

    Args:
        pixels: ``(B, H, W)`` non-negative relevance maps at the masks' resolution (in the graph).
        masks: ``(B, H, W)`` foreground masks.
        effect_share: ``(B,)`` from :func:`background_effect_share`.
        train: which side the gradient moves: ``"decision"`` (the map's share is the target),
            ``"both"`` or ``"map"`` (the measured share is the target).
        symmetric: penalise the gap in both directions, ``(s - e)^2``.

    Returns:
        A scalar tensor; 0 when no map claims less background than the decision reads.

    Example:
        >>> import torch
        >>> masks = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
        >>> maps = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])  # background share 0.75
        >>> faithfulness_loss(maps, masks, torch.tensor([0.75])).item()
        0.0
    """
    if pixels.shape != masks.shape:
        raise ValueError(
            f"Expected pixels and masks of one shape, but got {tuple(pixels.shape)} and "
            f"{tuple(masks.shape)}."
        )
    if train not in TRAIN:
        raise ValueError(f"Expected train to be one of {TRAIN}, but got {train!r}.")
    r = pixels.clamp_min(0).flatten(1)
    share = (r * (1 - masks.to(r.dtype).flatten(1))).sum(1) / r.sum(1).clamp_min(1e-12)
    effect = effect_share.to(share.dtype)
    share = share.detach() if train == "decision" else share
    effect = effect.detach() if train == "map" else effect
    gap = effect - share
    return (gap if symmetric else gap.clamp_min(0)).pow(2).mean()
