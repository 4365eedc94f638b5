"""captum 0.9's ``Lime`` set up as relreg's ``lime`` is defined, for the parity test and
experiments/bench_peers.py: the patch grid as features, relreg's on/off samples (fed through
``perturb_func``), the LIME package's kernel (marcotcr/lime: ``sqrt(exp(-d^2 / 0.25^2))`` of the
cosine distance to the all-on sample, as ``similarity_func``) and ``SkLearnRidge(alpha=1)`` with
intercept."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def relreg_samples(n_features: int, n_samples: int, seed: int) -> Tensor:
    """``(n_samples, n_features)`` on/off samples as relreg's ``lime`` documents its draw:
    feature by feature from ``seed``, the first sample keeping every feature."""
    gen = torch.Generator().manual_seed(seed)
    samples = torch.randint(0, 2, (n_features, n_samples), generator=gen).T.float()
    samples[0] = 1
    return samples


def captum_lime(
    model: nn.Module, x: Tensor, target: Tensor, patch: int, samples: Tensor, chunk: int
) -> Callable[[], Tensor]:
    """A call of captum's ``Lime`` on ``x`` ``(B, C, H, W)``, square ``patch`` features and the
    given ``samples``, returning ``(B, H, W)`` maps; ``chunk`` copies per forward pass."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    rows, cols = x.shape[-2] // patch, x.shape[-1] // patch
    grid = torch.arange(rows * cols).view(rows, cols)
    mask = grid.repeat_interleave(patch, 0).repeat_interleave(patch, 1)[None, None]
    mask = mask.expand(len(x), 1, -1, -1).contiguous()  # (B, 1, H, W)

    def perturb(inputs, **kwargs):  # noqa: ANN001, ANN003, ANN202  (a generator: per image)
        yield from (row[None] for row in samples)

    def kernel(original, perturbed, interpretable, **kwargs):  # noqa: ANN001, ANN003, ANN202
        z = interpretable.flatten().double()
        d = 1 - z.sum() / (z.norm() * z.numel() ** 0.5) if z.any() else torch.ones(())
        return float(torch.exp(-(d**2) / 0.25**2).sqrt())

    lime = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=kernel,
                perturb_func=perturb)  # fmt: skip
    return lambda: lime.attribute(
        x, target=target, baselines=0.0, feature_mask=mask, n_samples=len(samples),
        perturbations_per_eval=chunk,
    )[:, 0]  # fmt: skip
