"""Sanity checks for saliency maps: does the map change when the model's weights are randomised?
(Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, "Sanity Checks for Saliency Maps", NeurIPS 2018.)

:func:`model_randomisation` re-draws the parameters of one part of the model at a time, from the
head down to the patch embedding, either cumulatively (``order="cascading"``: the head, then the
head and the last block, ...) or one part alone (``"independent"``), explains the same images with
the same target class after each step, and compares each map with the original one. A method
whose maps stay similar once the weights that produce the prediction are random does not explain
the model. Similarities, per image (``(steps, B)``):

- ``spearman`` / ``spearman_abs``: Spearman rank correlation of the raw maps / of their absolute
  values (torchmetrics' ``spearman_corrcoef``);
- ``ssim``: structural similarity of the min-max normalised pixel maps (torchmetrics'
  ``structural_similarity_index_measure``, data range 1);
- ``hog``: Pearson correlation of histograms of oriented gradients of the normalised maps (9
  unsigned orientations per cell, each cell L2-normalised; a simplified HOG without the block
  normalisation of scikit-image's).

Randomising a part replaces every parameter tensor of it by Gaussian noise with the tensor's own
mean and standard deviation (seeded), so scales stay as trained. The model passed in is not
changed: a copy is randomised. Label randomisation (fine-tuning on shuffled labels, the paper's
second test) is a training recipe, not a function: see the evaluation guide.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.image import structural_similarity_index_measure

from relreg.explain import explain_with_logits, explainer_info, to_pixels
from relreg.validate import check_choice

__all__ = [
    "ORDERS",
    "RandomisationResult",
    "model_randomisation",
    "randomisation_steps",
    "sanity_report",
]

ORDERS = ("cascading", "independent")
SIMILARITIES = ("spearman", "spearman_abs", "ssim", "hog")


@dataclass
class RandomisationResult:
    """What :func:`model_randomisation` measured.

    Attributes:
        method: the explainer.
        order: ``"cascading"`` or ``"independent"``.
        steps: names of the randomised parts, in order (``"head"``, ``"blocks.11"``, ...).
        similarity: ``{name: (steps, B)}`` similarity of each step's map with the original.
        maps: ``(steps + 1, B, H, W)`` normalised pixel maps, the original first.
    """

    method: str
    order: str
    steps: list[str]
    similarity: dict[str, Tensor]
    maps: Tensor = field(repr=False)

    def summary(self) -> dict:
        """``{"steps": [...], <similarity>: [mean over images per step]}``, JSON-ready."""
        out: dict = {"method": self.method, "order": self.order, "steps": list(self.steps)}
        for name, values in self.similarity.items():
            out[name] = [round(float(v), 4) for v in values.nanmean(dim=1)]
        return out


def randomisation_steps(model: nn.Module) -> list[str]:
    """The parts of a timm ViT from the output down: ``head`` (with ``head_dist`` and an attention
    pool), the final ``norm`` / ``fc_norm``, ``blocks.<last>`` ... ``blocks.0``, ``patch_embed``
    (with the position and prefix tokens and ``norm_pre``). Parts the model lacks are left out."""
    names = dict(model.named_children())
    steps = [n for n in ("head", "fc_norm", "norm") if n in names and _has_params(names[n])]
    blocks = names.get("blocks")
    if isinstance(blocks, nn.Sequential | nn.ModuleList):
        steps += [f"blocks.{i}" for i in reversed(range(len(blocks)))]
    if "patch_embed" in names:
        steps.append("patch_embed")
    if not steps:
        raise ValueError(
            f"Expected a timm ViT (head, blocks, patch_embed), but {type(model).__name__} has "
            f"children {sorted(names)}."
        )
    return steps


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


# parameters outside a step's own module that belong to it
_PART_EXTRAS = {
    "head": ("head_dist", "attn_pool"),
    "patch_embed": ("pos_embed", "cls_token", "reg_token", "dist_token", "norm_pre"),
}


def _part(step: str) -> tuple[str, ...]:
    """Parameter-name prefixes a step randomises."""
    return (step, *_PART_EXTRAS.get(step, ()))


def _randomise(model: nn.Module, step: str, gen: torch.Generator) -> None:
    prefixes = _part(step)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name == pre or name.startswith(pre + ".") for pre in prefixes):
                std = p.float().std() if p.numel() > 1 else p.float().abs()
                noise = torch.randn(p.shape, generator=gen).to(p.device, torch.float32)
                p.copy_((p.float().mean() + noise * std.clamp_min(1e-8)).to(p.dtype))


def _hog(x: Tensor, bins: int = 9) -> Tensor:
    """``(B, features)`` cell histograms of unsigned gradient orientations of ``(B, H, W)``."""
    cell = max(2, min(x.shape[-2:]) // 8)
    gy = torch.zeros_like(x)
    gx = torch.zeros_like(x)
    gy[:, 1:-1] = x[:, 2:] - x[:, :-2]
    gx[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
    magnitude = (gx**2 + gy**2).sqrt()
    angle = torch.atan2(gy, gx) % math.pi
    index = (angle / math.pi * bins).long().clamp_max(bins - 1)
    hist = torch.zeros(*x.shape, bins, dtype=x.dtype, device=x.device)
    hist.scatter_(-1, index.unsqueeze(-1), magnitude.unsqueeze(-1))
    b, h, w = x.shape
    hc, wc = h // cell, w // cell
    cells = hist[:, : hc * cell, : wc * cell].reshape(b, hc, cell, wc, cell, bins).sum((2, 4))
    cells = cells / cells.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return cells.flatten(1)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denom = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return (a * b).sum(1) / denom


def _similarities(ref_raw: Tensor, raw: Tensor, ref_pix: Tensor, pix: Tensor) -> dict[str, Tensor]:
    """Per-image ``(B,)`` similarities of two batches of maps."""
    a, b = ref_raw.flatten(1).double(), raw.flatten(1).double()
    spear = spearman_corrcoef(b.T.contiguous(), a.T.contiguous())
    spear_abs = spearman_corrcoef(b.abs().T.contiguous(), a.abs().T.contiguous())
    ssim = structural_similarity_index_measure(
        pix.unsqueeze(1).double(),
        ref_pix.unsqueeze(1).double(),
        data_range=1.0,
        reduction="none",
        kernel_size=min(11, *pix.shape[-2:]) // 2 * 2 + 1,
    )
    hog = _pearson(_hog(pix.double()), _hog(ref_pix.double()))
    return {"spearman": spear, "spearman_abs": spear_abs, "ssim": ssim, "hog": hog}


def model_randomisation(
    model: nn.Module,
    images: Tensor,
    method: str = "chefer",
    order: str = "cascading",
    target: Tensor | int | None = None,
    seed: int = 0,
    steps: list[str] | None = None,
    **options: object,
) -> RandomisationResult:
    """Explain ``images`` with ``model`` and with copies whose weights are progressively (or one
    part at a time) randomised, and compare the maps.

    Args:
        model: a timm ViT (left unchanged; a copy is randomised). Its train/eval mode is kept.
        images: ``(B, C, H, W)`` batch.
        method: explainer name (:func:`relreg.explain.list_explainers`).
        order: ``"cascading"`` (cumulative, from the head down) or ``"independent"``.
        target: explained class; None: the original model's top-1, kept for every step.
        seed: seeds the noise, and the explainer's own ``seed`` option when it has one and
            ``options`` does not set it.
        steps: the parts to randomise, in order; default :func:`randomisation_steps`.
        **options: the explainer's options.

    Returns:
        A :class:`RandomisationResult` (similarities ``(steps, B)``, maps for figures).
    """
    check_choice("order", order, ORDERS)
    if "seed" in explainer_info(method).options:
        options.setdefault("seed", seed)
    steps = list(steps) if steps is not None else randomisation_steps(model)
    known = set(randomisation_steps(model))
    unknown = [s for s in steps if s not in known]
    if unknown:
        raise ValueError(f"Expected steps among {sorted(known)}, but got {unknown}.")
    original = explain_with_logits(model, images, method, target=target, **options)
    tgt = original.logits.argmax(1) if target is None else target
    size = images.shape[-2:]
    ref_pix = to_pixels(original.maps, size=size)
    maps = [ref_pix]
    scores: dict[str, list[Tensor]] = {k: [] for k in SIMILARITIES}
    gen = torch.Generator().manual_seed(int(seed))
    work = copy.deepcopy(model)
    state = copy.deepcopy(model.state_dict())
    for step in steps:
        if order == "independent":
            work.load_state_dict(state)
        _randomise(work, step, gen)
        raw = explain_with_logits(work, images, method, target=tgt, **options).maps
        pix = to_pixels(raw, size=size)
        maps.append(pix)
        for k, v in _similarities(original.maps, raw, ref_pix, pix).items():
            scores[k].append(v.float().cpu())
    similarity = {k: torch.stack(v) for k, v in scores.items()}
    return RandomisationResult(method, order, steps, similarity, torch.stack(maps).cpu())


def sanity_report(
    models: dict[str, nn.Module],
    images: Tensor,
    methods: list[str],
    order: str = "cascading",
    seed: int = 0,
) -> tuple[dict, dict[str, RandomisationResult]]:
    """:func:`model_randomisation` for every model and method on one batch (``relreg evaluate
    --sanity``).

    Returns:
        ``({label: {method: RandomisationResult.summary()}}, {"<label>/<method>": result})``.
    """
    summary: dict = {}
    results: dict[str, RandomisationResult] = {}
    for label, model in models.items():
        summary[label] = {}
        for method in methods:
            torch.manual_seed(seed)
            result = model_randomisation(model, images, method, order=order, seed=seed)
            summary[label][method] = result.summary()
            results[f"{label}/{method}"] = result
    return summary, results
