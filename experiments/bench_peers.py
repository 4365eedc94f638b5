"""relreg's explainers against the peers users know, side by side: time, peak memory, agreement.

    pip install 'relreg[peers]'    # captum 0.9, grad-cam 1.5.7 (make venv installs them)
    python experiments/bench_peers.py --out experiments/results/bench_peers.json

The same model (timm's ViT-Ti/16 at 224 px, random weights, seed 0) and the same images
(scikit-image's photographs, resized) for every method. Every (library, method) runs in its own
process: the median time of ``--repeats`` calls on the batch after a warm-up, and the process's
peak RSS over its RSS before the first call. The maps come back to this process and are compared
where the two definitions are the same:

- saliency: max over channels of ``|dy/dx|`` (captum ``Saliency(abs=True)``);
- integrated gradients: channel sum, 16 midpoint steps from 0 (captum ``IntegratedGradients``,
  ``method="riemann_middle"``);
- occlusion: 16-px windows and strides filled with 0, the channel mean (captum ``Occlusion`` with
  ``perturbations_per_eval=64``, relreg's default chunk; captum's default of 1 took 125 s here);
- SmoothGrad: captum's ``NoiseTunnel`` draws its own noise, so its maps are compared by
  correlation; relreg's definition is checked exactly by a second captum run on relreg's own noisy
  copies (``Saliency`` on each, averaged), the noise matched;
- Grad-CAM: pytorch-grad-cam's ``GradCAM`` on the last block's first norm with the token
  reshape of its ViT tutorial; another convention than relreg's (ReLU and normalisation), so
  only correlated;
- LIME (``tests/explain/captum_lime.py``, shared with the parity test): captum ``Lime`` with
  relreg's features (the patch grid), its on/off samples (the same draws, fed through
  ``perturb_func``), the LIME package's kernel (``sqrt(exp(-d^2 / 0.25^2))`` of the cosine
  distance to the all-on vector, as ``similarity_func``), a fill of 0 and ``SkLearnRidge(alpha=1)``
  with intercept: the same definition, so the maps must agree up to captum's float32 fit;
- AttnLRP: LXT 2.1's CP-LRP (``lxt.efficient``'s ``vit_torch.cp_LRP`` patch on torchvision's
  ``VisionTransformer``, its ``examples/vit_torch.py`` recipe) against relreg's ``attnlrp`` on timm,
  the same weights (``relreg.models.timm_state_from_torchvision_vit``), LXT in its own process
  (its patches change torch's classes);
- batched Chefer relevance against one image at a time, as the CVPR 2021 code runs it.

Writes the JSON, a figure next to it, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CASES = (
    "relreg:saliency",
    "captum:saliency",
    "relreg:integrated_gradients",
    "captum:integrated_gradients",
    "relreg:occlusion",
    "captum:occlusion",
    "relreg:smoothgrad",
    "captum:smoothgrad",
    "captum:smoothgrad_matched",
    "relreg:gradcam",
    "gradcam:gradcam",
    "relreg:lime",
    "captum:lime",
    "relreg:attnlrp",
    "lxt:attnlrp",
    "relreg:chefer",
    "loop:chefer",
)
SIZE, BATCH, STEPS, SAMPLES, NOISE = 224, 4, 16, 16, 0.15
LIME_SAMPLES, CHUNK = 128, 64  # LIME's perturbed copies per image; copies per forward pass


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_and_images():  # noqa: ANN201
    import timm
    from skimage import data
    from torch.nn import functional as F

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()][:BATCH]
    x = torch.stack(
        [
            F.interpolate(
                torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255,
                (SIZE, SIZE),
                mode="bilinear",
                antialias=True,
            )[0]
            for p in photos
        ]
    )
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target


def _relreg(method: str, model, x, target):  # noqa: ANN001, ANN202
    from relreg.explain import explain

    options = {
        "integrated_gradients": {"steps": STEPS, "baseline": 0.0},
        "smoothgrad": {"n_samples": SAMPLES, "noise_level": NOISE, "seed": 0},
        "occlusion": {"window": 16, "baseline": 0.0},
        "lime": {
            "n_samples": LIME_SAMPLES,
            "baseline": 0.0,
            "seed": 0,
            "internal_batch_size": CHUNK,
        },  # fmt: skip
    }.get(method, {})
    return lambda: explain(model, x, method, target=target, **options)


def _captum(method: str, model, x, target):  # noqa: ANN001, ANN202
    from captum.attr import IntegratedGradients, NoiseTunnel, Occlusion, Saliency

    if method == "saliency":
        return lambda: Saliency(model).attribute(x, target=target, abs=True).amax(1)
    if method == "integrated_gradients":
        ig = IntegratedGradients(model)
        return lambda: ig.attribute(
            x, baselines=0.0, target=target, n_steps=STEPS, method="riemann_middle"
        ).sum(1)
    if method == "occlusion":
        occ = Occlusion(model)
        return lambda: occ.attribute(  # 64 occluded copies per pass, as relreg's default
            x, target=target, sliding_window_shapes=(3, 16, 16), strides=(3, 16, 16),
            baselines=0.0, perturbations_per_eval=64,
        ).mean(1)  # fmt: skip
    if method == "smoothgrad":
        flat = x.flatten(1)
        sigma = float(NOISE * (flat.amax(1) - flat.amin(1)).mean())
        nt = NoiseTunnel(Saliency(model))
        return lambda: nt.attribute(
            x, nt_type="smoothgrad", nt_samples=SAMPLES, stdevs=sigma, target=target, abs=True
        ).amax(1)
    if method == "smoothgrad_matched":  # captum's Saliency on relreg's own noisy copies
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn((SAMPLES, 1, *x.shape[1:]), generator=gen)
        flat = x.flatten(1)
        sigma = NOISE * (flat.amax(1) - flat.amin(1))
        points = x[None] + noise * sigma.view(1, -1, 1, 1, 1)
        sal = Saliency(model)

        def run():  # noqa: ANN202
            grads = [sal.attribute(p, target=target, abs=True) for p in points]
            return torch.stack(grads).mean(0).amax(1)

        return run
    if method == "lime":
        return _captum_lime(model, x, target)
    raise ValueError(method)


def _peer_module(name: str):  # noqa: ANN202
    """A peer set-up shared with the parity tests (``tests/explain/<name>.py``)."""
    import importlib.util

    path = Path(__file__).parents[1] / "tests" / "explain" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _captum_lime(model, x, target):  # noqa: ANN001, ANN202
    peer = _peer_module("captum_lime")
    samples = peer.relreg_samples((SIZE // 16) ** 2, LIME_SAMPLES, seed=0)
    return peer.captum_lime(model, x, target, 16, samples, CHUNK)


def _lxt_attnlrp(model, x, target):  # noqa: ANN001, ANN202
    """LXT's CP-LRP on torchvision's ViT holding ``model``'s weights (after ``tests/explain/
    lxt_runner.py``, whose stand-ins import LXT's ViT patch without its LLM patches)."""
    from relreg.models import timm_state_from_torchvision_vit

    monkey_patch, vit_torch = _peer_module("lxt_runner")._import_vit_patch()
    from torchvision.models import vision_transformer as tvv

    monkey_patch(tvv, patch_map=vit_torch.cp_LRP)
    blocks = len(model.blocks)
    tv = tvv.VisionTransformer(
        SIZE,
        16,
        blocks,
        model.blocks[0].attn.num_heads,
        model.embed_dim,
        model.blocks[0].mlp.fc1.out_features,
        num_classes=model.num_classes,
    )
    with torch.no_grad():  # the timm model's tensors copied into torchvision's, name by name
        ours = model.state_dict()
        for name, tensor in timm_state_from_torchvision_vit(tv.state_dict()).items():
            tensor.copy_(ours[name])
    tv.eval().requires_grad_(False)

    def run():  # noqa: ANN202  (LXT's examples/vit_torch.py)
        pixels = x.clone().requires_grad_(True)
        tv(pixels).gather(1, target[:, None]).sum().backward()
        return (pixels * pixels.grad).sum(1)

    return run


def _gradcam(model, x, target):  # noqa: ANN001, ANN202
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def reshape(t):  # noqa: ANN001, ANN202  (pytorch-grad-cam's ViT tutorial)
        side = int((t.shape[1] - 1) ** 0.5)
        return t[:, 1:, :].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

    cam = GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape)
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    return lambda: torch.from_numpy(cam(input_tensor=x, targets=targets))


def _loop_chefer(model, x, target):  # noqa: ANN001, ANN202
    from relreg.explain import explain

    return lambda: torch.cat(
        [explain(model, x[i : i + 1], "chefer", target=target[i : i + 1]) for i in range(len(x))]
    )


def worker(case: str, repeats: int, maps_out: Path) -> dict:
    library, method = case.split(":")
    model, x, target = model_and_images()
    if library == "relreg":
        run = _relreg(method, model, x, target)
    elif library == "captum":
        run = _captum(method, model, x, target)
    elif library == "gradcam":
        run = _gradcam(model, x, target)
    elif library == "lxt":
        run = _lxt_attnlrp(model, x, target)
    else:
        run = _loop_chefer(model, x, target)
    base = _rss_mb()
    maps = run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        maps = run()
        times.append(time.perf_counter() - start)
    maps = maps.maps if hasattr(maps, "maps") else maps
    torch.save(maps.detach().float().cpu(), maps_out)
    return {"s": statistics.median(times), "all_s": times, "peak_mb": _rss_mb() - base}


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image Pearson correlation of ``(B, h, w)`` and ``(B, H, W)`` maps (the coarser
    one upsampled, nearest)."""
    if a.shape[-2:] != b.shape[-2:]:
        size = max(a.shape[-2:], b.shape[-2:])
        a, b = (F.interpolate(m[:, None].double(), size, mode="nearest")[:, 0] for m in (a, b))
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)).mean())


PAIRS = [  # (ours, theirs, what)
    ("relreg:saliency", "captum:saliency", "same definition"),
    ("relreg:integrated_gradients", "captum:integrated_gradients", "same definition"),
    ("relreg:occlusion", "captum:occlusion", "same definition"),
    ("relreg:smoothgrad", "captum:smoothgrad_matched", "same definition, noise matched"),
    ("relreg:smoothgrad", "captum:smoothgrad", "captum's own noise"),
    ("relreg:lime", "captum:lime", "same definition, samples matched"),
    ("relreg:attnlrp", "lxt:attnlrp", "same definition (CP-LRP), shared weights"),
    ("relreg:gradcam", "gradcam:gradcam", "another convention"),
    ("relreg:chefer", "loop:chefer", "one image at a time"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_peers.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--maps", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, args.maps)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from machine_info import machine

    from relreg.io import atomic_write

    tmp = args.out.parent / ".peers_maps"
    tmp.mkdir(parents=True, exist_ok=True)
    results, maps = {}, {}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for case in CASES:
        path = tmp / f"{case.replace(':', '_')}.pt"
        cmd = [sys.executable, __file__, "--worker", case, "--repeats", str(args.repeats)]
        out = subprocess.run([*cmd, "--maps", str(path)], check=True, capture_output=True,
                             text=True, env=env)  # fmt: skip
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
        maps[case] = torch.load(path)
        path.unlink()
        print(f"{case:32s} {results[case]['s']:.3f} s  peak {results[case]['peak_mb']:.0f} MB")
    tmp.rmdir()
    rows = []
    for ours, theirs, what in PAIRS:
        a, b = maps[ours], maps[theirs]
        row = {
            "relreg": ours, "peer": theirs, "what": what,
            "time_ratio": round(results[ours]["s"] / results[theirs]["s"], 3),
            "memory_ratio": round(results[ours]["peak_mb"] / max(results[theirs]["peak_mb"], 1), 3),
            "corr": round(_corr(a, b), 4),
        }  # fmt: skip
        if a.shape == b.shape:
            scale = b.abs().max().item() or 1.0
            row["max_abs_diff_rel"] = float((a - b).abs().max() / scale)
        rows.append(row)
        print(f"{ours:28s} vs {theirs:28s} time x{row['time_ratio']:.2f} corr {row['corr']:.4f}")
    report = {"machine": machine("cpu"), "model": "vit_tiny_patch16_224", "img_size": SIZE,
              "batch": BATCH, "repeats": args.repeats, "cases": results, "pairs": rows}  # fmt: skip
    atomic_write(args.out, lambda t: Path(t).write_text(json.dumps(report, indent=2)))
    _plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from relreg.io import atomic_write

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    labels = [f"{r['relreg'].split(':')[1]} vs {r['peer']}" for r in rows]
    ax.barh(labels, [r["time_ratio"] for r in rows], color="C0")
    ax.axvline(1.0, color="k", lw=0.8)
    for i, r in enumerate(rows):
        ax.text(r["time_ratio"], i, f"  corr {r['corr']:.3f}", va="center", fontsize=7)
    ax.set_xlabel("relreg time / peer time (lower: relreg faster)")
    ax.invert_yaxis()
    fig.tight_layout()
    atomic_write(path, lambda t: fig.savefig(t, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
