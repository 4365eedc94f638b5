"""``relreg demo``: the whole pipeline on the built-in CPU benchmark in well under a minute.

Trains a tiny ViT (plain cross-entropy) on generated shapes, explains held-out images with every
registered explainer in one batched call each, and writes ``explainers.png`` (methods x images)
and ``summary.json`` (accuracy, time per method, and the share of each map's relevance that falls
on the shape's mask).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from relreg.data import SHAPES, make_shapes
from relreg.explain import explain, list_explainers, to_pixels
from relreg.viz import explanation_grid, save_figure

__all__ = ["run_demo"]

_MEAN, _STD = 0.5, 0.5
_FAST = {"smoothgrad": {"n_samples": 8}, "integrated_gradients": {"steps": 16}}


def _tiny_vit(num_classes: int, size: int) -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        img_size=size,
        patch_size=4,
        embed_dim=64,
        depth=4,
        num_heads=4,
    )


def run_demo(
    out: Path, steps: int = 300, seed: int = 0, size: int = 32, num_classes: int = 4
) -> dict:
    """Train, explain and plot; returns the summary written to ``out/summary.json``."""
    if steps < 0:
        raise ValueError(f"Expected steps >= 0, but got {steps}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    train = make_shapes(
        2048, size=size, num_classes=num_classes, seed=seed, spurious=1 / num_classes
    )
    test = make_shapes(
        256, size=size, num_classes=num_classes, seed=seed + 1, spurious=1 / num_classes
    )
    model = _tiny_vit(num_classes, size)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="train tiny ViT", unit="step", mininterval=2):
        idx = torch.randint(0, len(train.labels), (64,), generator=g)
        loss = F.cross_entropy(model((train.images[idx] - _MEAN) / _STD), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x_test = (test.images - _MEAN) / _STD
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == test.labels).float().mean().item()

    shown = slice(0, 6)
    x, masks = x_test[shown], test.masks[shown]
    maps, summary_methods = {}, {}
    for name in list_explainers():
        t0 = time.perf_counter()
        raw = explain(model, x, name, target=test.labels[shown], **_FAST.get(name, {}))
        seconds = time.perf_counter() - t0
        pix = to_pixels(raw, size=x.shape[-2:])
        maps[name] = pix
        inside = (pix * masks).flatten(1).sum(1) / pix.flatten(1).sum(1).clamp_min(1e-12)
        summary_methods[name] = {
            "seconds": round(seconds, 4),
            "relevance_in_mask": round(inside.mean().item(), 4),
        }
    titles = [SHAPES[int(c)] for c in test.labels[shown]]
    figure = save_figure(explanation_grid(test.images[shown], maps, titles), out / "explainers.png")
    summary = {
        "model": "vit_tiny (3 blocks, 64 dims, 4x4 patches), random init, plain cross-entropy",
        "image_size": size,
        "train_steps": steps,
        "test_accuracy": round(acc, 4),
        "mask_fraction_of_image": round(masks.mean().item(), 4),
        "methods": summary_methods,
        "figure": str(figure),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary
