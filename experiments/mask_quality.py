"""How good are masks made without humans? TokenCut (``relreg.masks.TokenCut``) against the true
masks of the two offline benchmarks, where every pixel's label is known.

    python experiments/mask_quality.py --out experiments/results/mask_quality.json

- **SpuriousScenes** (real handwritten digits on crops of real photographs, 32 px, the real-image
  study's ``configs/study/scenes.yaml``): TokenCut on the study's source model, a ViT-tiny
  (4 blocks, 4-px patches) trained *supervised* on the 10-digit source task with every background
  at random (``robustness.protocol._pretrained``, cached in ``runs/study_sources``; trained here
  if absent, about 5 minutes on 2 CPU cores). The masks the study's ``*_tokencut`` arms train on.
- **SpuriousShapes** (32 px): TokenCut on the demo's stage-1 model (``make demo``:
  ``runs/demo/pretrain/final.ckpt``, supervised on unbiased shapes).

No self-supervised ViT fits this project's CPU budget and no weights can be downloaded, so both
models are supervised (TokenCut's paper uses DINO). Rows: TokenCut on the keys (TokenCut's
default), queries and values; with the bilateral refinement; on a random-initialised ViT of the
same architecture (what the features add); two priors (the whole image, a centred square of the
true masks' mean area); and the patch oracle, the true mask rounded to the patch grid (the best
any patch-level mask can do). Also a sweep of the graph threshold ``tau``. Metrics over ``--n``
OOD images: mIoU (mean per-image IoU of the foreground), the masks' and the truth's mean
foreground share, empty masks, seconds per image. Writes the JSON, ``mask_quality.png``
(overlays) and ``mask_quality_tau.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from machine_info import machine  # noqa: E402
from robustness.protocol import ROOT, _pretrained, make_split, new_model  # noqa: E402

from relreg.data import SpuriousShapes  # noqa: E402
from relreg.io import atomic_write  # noqa: E402
from relreg.masks import TokenCut, bilateral_refine  # noqa: E402
from relreg.models import model_from_checkpoint  # noqa: E402

TAUS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
# TokenCut's spatial bandwidth (16 px) is for images of a few hundred pixels; on 32-px images it
# spans half the image, so the refinement here scales it down (the colour bandwidths stay)
REFINE = {"sigma_spatial": 4.0}


def iou(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-image foreground IoU of ``(n, H, W)`` bool masks (1 where both are empty)."""
    inter = (pred & true).flatten(1).sum(1).float()
    union = (pred | true).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def scores(pred: torch.Tensor, true: torch.Tensor, seconds: float | None = None) -> dict:
    per = iou(pred, true)
    return {
        "miou": round(100 * per.mean().item(), 2),
        "foreground_share": round(pred.float().mean().item(), 4),
        "true_foreground_share": round(true.float().mean().item(), 4),
        "empty": int((pred.flatten(1).sum(1) == 0).sum()),
        "seconds_per_image": None if seconds is None else round(seconds / len(pred), 5),
    }


def tokencut_masks(segment: TokenCut, pixels: torch.Tensor, refine: bool = False):
    start = time.perf_counter()
    masks = []
    for i in range(0, len(pixels), 64):
        masks += segment(list(pixels[i : i + 64]))
    if refine:
        masks = [bilateral_refine(p, m, **REFINE) for p, m in zip(pixels, masks, strict=True)]
    return torch.stack(masks), time.perf_counter() - start


def centre_square(true: torch.Tensor) -> torch.Tensor:
    n, h, w = true.shape
    side = max(1, round(math.sqrt(true.float().mean().item() * h * w)))
    out = torch.zeros_like(true)
    top, left = (h - side) // 2, (w - side) // 2
    out[:, top : top + side, left : left + side] = True
    return out


def patch_oracle(true: torch.Tensor, patch: int) -> torch.Tensor:
    pooled = F.avg_pool2d(true[:, None].float(), patch) > 0.5
    return F.interpolate(pooled.float(), true.shape[-2:], mode="nearest")[:, 0].bool()


def benchmark_rows(model: torch.nn.Module, random_model: torch.nn.Module, pixels, true) -> dict:
    """Every row of the table for one benchmark, plus the tau sweep and the masks to plot."""
    rows: dict[str, dict] = {}
    made = {}
    for features in ("k", "q", "v"):
        masks, seconds = tokencut_masks(TokenCut(model, features=features), pixels)
        rows[f"tokencut ({features})"] = scores(masks, true, seconds)
        made[features] = masks
    depth = len(model.blocks)
    for block in range(depth - 1):
        masks, seconds = tokencut_masks(TokenCut(model, block=block), pixels)
        rows[f"tokencut (k), block {block + 1} of {depth}"] = scores(masks, true, seconds)
    masks, seconds = tokencut_masks(TokenCut(model), pixels, refine=True)
    rows["tokencut (k) + bilateral solver"] = scores(masks, true, seconds)
    made["refined"] = masks
    masks, seconds = tokencut_masks(TokenCut(random_model), pixels)
    rows["tokencut (k), random-initialised ViT"] = scores(masks, true, seconds)
    rows["prior: whole image"] = scores(torch.ones_like(true), true)
    rows["prior: centred square"] = scores(centre_square(true), true)
    patch = model.patch_embed.patch_size
    rows["patch oracle (true mask on the patch grid)"] = scores(
        patch_oracle(true, patch[0] if isinstance(patch, tuple) else patch), true
    )
    sweep = {}
    for tau in TAUS:
        masks, _ = tokencut_masks(TokenCut(model, tau=tau), pixels)
        sweep[str(tau)] = scores(masks, true)["miou"]
    return {"rows": rows, "tau_sweep": sweep, "made": made}


def scenes_data(n: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    cfg = yaml.safe_load((ROOT / "configs" / "study" / "scenes.yaml").read_text())
    model = _pretrained(cfg, "scenes", 0, print).eval()
    torch.manual_seed(0)
    random_model = new_model(cfg).eval()
    data = make_split(cfg, "scenes", "ood", n, seed=1, held_out=True)
    pixels = ((data["image"] * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    return model, random_model, pixels, data["mask"].bool()


def shapes_data(checkpoint: Path, n: int):
    if not checkpoint.is_file():
        raise SystemExit(f"{checkpoint} is missing: run `make demo` first")
    model = model_from_checkpoint(checkpoint)
    torch.manual_seed(0)
    random_model = _random_like(checkpoint)
    ds = SpuriousShapes(split="ood", n=n)  # normalised with mean = std = 0.5
    pixels = ((ds.images * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    return model, random_model, pixels, ds.masks.bool()


def _random_like(checkpoint: Path) -> torch.nn.Module:
    from relreg.models import build_model, lightning_model_args

    spec = lightning_model_args(checkpoint)
    name, num_classes = spec.pop("name"), spec.pop("num_classes")
    return build_model(name, num_classes=num_classes, **spec).eval()


def plot_overlays(results: dict, images: dict, path: Path, columns: int = 8) -> None:
    kinds = list(results)
    fig, axes = plt.subplots(3 * len(kinds), columns, figsize=(1.4 * columns, 4.4 * len(kinds)))
    for b, kind in enumerate(kinds):
        pixels, true = images[kind]
        made = results[kind]["made"]["k"]
        for c in range(columns):
            panels = [
                (pixels[c].permute(1, 2, 0), "image"),
                (true[c], "true mask"),
                (made[c], "TokenCut (k)"),
            ]
            for r, (panel, label) in enumerate(panels):
                ax = axes[3 * b + r, c]
                ax.imshow(panel, cmap=None if r == 0 else "gray", vmin=0, vmax=1 if r else None)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(f"{kind}\n{label}" if r == 0 else label, fontsize=8)
    fig.suptitle("TokenCut masks against the true masks (OOD images)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_tau(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    for kind, result in results.items():
        taus = [float(t) for t in result["tau_sweep"]]
        ax.plot(taus, list(result["tau_sweep"].values()), marker="o", label=kind)
        oracle = result["rows"]["patch oracle (true mask on the patch grid)"]["miou"]
        ax.axhline(oracle, ls=":", color=ax.lines[-1].get_color(), lw=1)
    ax.axvline(0.2, color="grey", lw=0.8)
    ax.set_xlabel("graph threshold tau (TokenCut: 0.2)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("TokenCut (k) against tau; dotted: patch oracle", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/mask_quality.json"))
    parser.add_argument("--n", type=int, default=256, help="OOD images per benchmark")
    parser.add_argument(
        "--shapes-checkpoint", type=Path, default=ROOT / "runs" / "demo" / "pretrain" / "final.ckpt"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    results, images = {}, {}
    for kind, load in (
        ("SpuriousScenes", lambda: scenes_data(args.n)),
        ("SpuriousShapes", lambda: shapes_data(args.shapes_checkpoint, args.n)),
    ):
        model, random_model, pixels, true = load()
        results[kind] = benchmark_rows(model, random_model, pixels, true)
        images[kind] = (pixels, true)
        for name, row in results[kind]["rows"].items():
            share = row["foreground_share"]
            print(f"{kind:15s} {name:45s} mIoU {row['miou']:5.1f}  share {share:.3f}")
    plot_overlays(results, images, args.out.with_suffix(".png"))
    plot_tau(results, args.out.with_name(args.out.stem + "_tau.png"))
    report = {
        "machine": machine("cpu"),
        "n": args.n,
        "benchmarks": {
            kind: {"rows": r["rows"], "tau_sweep": r["tau_sweep"]} for kind, r in results.items()
        },
        "median_seconds_per_image_tokencut_k": statistics.median(
            r["rows"]["tokencut (k)"]["seconds_per_image"] for r in results.values()
        ),
    }
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
