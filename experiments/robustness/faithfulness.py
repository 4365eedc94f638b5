"""The faithfulness test: where a model's maps put relevance against where its prediction reads.

:func:`faithfulness` intervenes on the OOD split (occluding or swapping the background, occluding
the cue, keeping only the object) and compares the prediction's changes with the share of
relevance each explainer gives the background and the cue's pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from relreg.explain import explain
from relreg.losses import swap_backgrounds
from relreg.metrics import relevance_share
from robustness.protocol import cue_region, make_split


@torch.no_grad()
def _class_prob(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return model(images).softmax(1).gather(1, target[:, None]).squeeze(1)


@torch.no_grad()
def _class_logit(
    model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    return model(images).gather(1, target[:, None]).squeeze(1)


def faithfulness(cfg: dict, model: torch.nn.Module, kind: str) -> dict:
    """Where the baseline's maps put relevance against where its prediction reads.

    Interventions on the OOD split, for the predicted class ``c``: the drop of ``p(c)`` (and of
    its logit, ``*_logit_drop``) when the background (or the object) is set to the dataset mean
    (0 after normalisation), and the share of predictions that change when the background is
    swapped for another image's. The maps' background share is ``1 - relevance mass``; the cue's
    share is the relevance on the cue's pixels (:func:`robustness.protocol.cue_region`), against
    ``cue_occlusion_drop``; ``per_image_corr`` is the Pearson correlation, over images, between a
    map's background share and the drop when the background is occluded. ``reads``: the share of
    predictions that follow the cue (and the shape) when only the patches the object touches, or
    only the object's pixels, are kept.

    Args:
        cfg: the study's config (``cfg["faithfulness"]``: ``n`` images and the ``explainers``).
        model: the model to test (left in train mode).
        kind: the benchmark.

    Returns:
        ``{"effects": {...}, "explainers": {name: {"relevance_bg_share",
        "relevance_cue_share", "per_image_corr"}}}``, rounded to 4 digits.
    """
    model.eval()
    n = cfg["faithfulness"]["n"]
    data = make_split(cfg, kind, "ood", n, seed=2)
    x = data["image"]
    m = data["mask"]
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    p = logits.softmax(1).gather(1, pred[:, None]).squeeze(1)
    fg = m.unsqueeze(1)
    cue = cue_region(x, m, kind)
    drop_bg = p - _class_prob(model, x * fg, pred)
    drop_fg = p - _class_prob(model, x * (1 - fg), pred)
    drop_cue = p - _class_prob(model, x * (1 - cue.unsqueeze(1)), pred)
    swapped = swap_backgrounds(x, m)
    with torch.no_grad():
        flips = (model(swapped).argmax(1) != pred).float().mean().item()
    pos_bg = drop_bg.clamp_min(0).mean()
    pos_fg = drop_fg.clamp_min(0).mean()
    z = logits.gather(1, pred[:, None]).squeeze(1)
    effects = {
        "bg_occlusion_logit_drop": (z - _class_logit(model, x * fg, pred)).mean().item(),
        "cue_occlusion_logit_drop": (z - _class_logit(model, x * (1 - cue.unsqueeze(1)), pred))
        .mean()
        .item(),
        "bg_swap_logit_drop": (z - _class_logit(model, swapped, pred)).mean().item(),
        "bg_occlusion_drop": drop_bg.mean().item(),
        "fg_occlusion_drop": drop_fg.mean().item(),
        "cue_occlusion_drop": drop_cue.mean().item(),
        "bg_effect_share": (pos_bg / (pos_bg + pos_fg).clamp_min(1e-8)).item(),
        "bg_swap_flip_rate": flips,
        "bg_area_share": (1 - m).mean().item(),
        "cue_area_share": cue.mean().item(),
    }
    # Which pixels carry the cue to the prediction? Keep only the patches the object touches (tint
    # at the object's edge included), or only the object's pixels, grey out the rest, and count
    # the predictions that follow the cue against those that follow the shape.
    patch = cfg["model"]["kwargs"]["patch_size"]
    touched = F.max_pool2d(fg, patch)
    touched = F.interpolate(touched, scale_factor=patch, mode="nearest")
    views = {"full": x, "object_patches_only": x * touched, "object_pixels_only": x * fg}
    reads = {}
    with torch.no_grad():
        for view, images in views.items():
            y = model(images).argmax(1)
            reads[view] = {
                "follows_cue": round((y == data["cue"]).float().mean().item(), 4),
                "follows_shape": round((y == data["label"]).float().mean().item(), 4),
            }
    effects["reads"] = reads
    explainers = {}
    for name in cfg["faithfulness"]["explainers"]:
        maps = explain(model, x, name, target=pred)
        bg_share = relevance_share(maps, 1 - m)
        cue_share = relevance_share(maps, cue)
        corr = torch.corrcoef(torch.stack([bg_share, drop_bg]))[0, 1].item()
        explainers[name] = {
            "relevance_bg_share": round(bg_share.mean().item(), 4),
            "relevance_cue_share": round(cue_share.mean().item(), 4),
            "per_image_corr": round(corr, 4) if corr == corr else None,
        }
    model.train()
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in effects.items()}
    return {"effects": rounded, "explainers": explainers}
