"""Study: when a relevance loss fails, where does the fine-tuned model still read the cue?

On some baselines of the robustness study (``experiments/robustness_baselines.py``), fine-tuning
with a relevance loss moves Chefer relevance off the tinted background while the model follows the
tint *more* often (RobustViT: Chefer, Schwartz & Wolf, NeurIPS 2022; the rule: Chefer, Gur & Wolf,
ICCV 2021). This script takes one such baseline, fine-tunes it with a few methods (one seed, the
study's protocol) and measures, for the baseline and each fine-tuned model, on OOD images:

- what the prediction reads: the study's faithfulness test (occluding or swapping the background,
  keeping only the patches the object touches or only its pixels; :func:`faithfulness`);
- where the maps put relevance: the share on the cue for several explainers, and for variants of
  the gradient-weighted attention rule that drop one of its choices: positive part only
  (``chefer``), negative part only, absolute value, and the maximum over heads instead of the mean
  (:func:`rule_variants`). If one variant kept the background's relevance while the others lost
  it, that choice would be where the cue hides.

    python experiments/robustness_mechanism.py --baseline-seed 1 --benchmark tint \\
        --out experiments/results/robustness_mechanism.json

Writes the JSON and ``*.png`` next to it. About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import torch
import yaml
from machine_info import machine  # experiments/machine_info.py (this script's folder)
from robustness_study import (
    DEFAULT_CONFIG,
    build_baseline,
    cue_region,
    faithfulness,
    fit,
    make_split,
    new_model,
    shrink,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from relreg.explain import AttentionCapture, explain, to_pixels  # noqa: E402
from relreg.io import atomic_write  # noqa: E402
from relreg.lightning import RelRegModule  # noqa: E402
from relreg.viz import save_figure  # noqa: E402

EXPLAINERS = ["chefer", "rollout", "transformer_attribution", "input_x_gradient"]
# how each variant turns the per-head product g * A (B, h, N, N) into one (B, N, N) matrix
VARIANTS = {
    "positive_mean": lambda p: p.clamp(min=0).mean(1),  # the chefer rule
    "negative_mean": lambda p: p.clamp(max=0).neg().mean(1),
    "abs_mean": lambda p: p.abs().mean(1),
    "positive_max_head": lambda p: p.clamp(min=0).amax(1),
}


def rule_variants(model: torch.nn.Module, images: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Patch relevance ``(B, N - 1)`` of each :data:`VARIANTS` rule, CLS read-out.

    One forward pass records every block's attention ``A_b: (B, h, N, N)``, one backward pass the
    gradients ``g_b`` of the target logit; each variant reduces ``g_b * A_b`` over heads to
    ``Abar_b`` and propagates ``v <- v + v Abar_b`` from the last block to the first, starting
    from the CLS read-out ``v = e_0`` (``positive_mean`` is ``chefer``). Assumes one prefix token
    (CLS) and token pooling, as the study's model has.
    """
    with torch.enable_grad(), AttentionCapture(model) as capture:
        logits = model(images)
    attentions = capture.attentions
    score = logits.gather(1, target[:, None]).sum()
    grads = torch.autograd.grad(score, attentions)
    out = {}
    with torch.no_grad():
        for name, reduce in VARIANTS.items():
            v = torch.zeros_like(attentions[-1][:, 0, 0])
            v[:, 0] = 1
            for a, g in zip(reversed(attentions), reversed(grads), strict=True):
                v = v + torch.bmm(v.unsqueeze(1), reduce(g * a))[:, 0]
            out[name] = v[:, 1:]
    return out


def cue_share(patches: Tensor, cue: Tensor) -> float:
    """Mean share of ``|relevance|`` on the cue's pixels; ``patches: (B, P)``, ``cue: (B, H, W)``."""
    side = int(patches.shape[1] ** 0.5)
    pix = to_pixels(patches.reshape(-1, side, side), size=cue.shape[-2:]).abs()
    total = pix.flatten(1).sum(1).clamp_min(1e-8)
    return round(((pix * cue).flatten(1).sum(1) / total).mean().item(), 4)


def measure(cfg: dict, model: torch.nn.Module, kind: str) -> dict:
    """Faithfulness test plus the rule variants' cue shares, on the study's OOD images."""
    result = faithfulness(cfg, model, kind)
    model.eval()
    data = make_split(cfg, kind, "ood", cfg["faithfulness"]["n"], seed=2)
    with torch.no_grad():
        pred = model(data["image"]).argmax(1)
    cue = cue_region(data["image"], data["mask"], kind)
    variants = rule_variants(model, data["image"], pred)
    result["rule_variants"] = {name: cue_share(v, cue) for name, v in variants.items()}
    # the rule re-implemented here is relreg's chefer: the same maps
    reference = explain(model, data["image"], "chefer", target=pred)
    torch.testing.assert_close(
        variants["positive_mean"].reshape(reference.shape), reference, rtol=1e-4, atol=1e-6
    )
    model.train()
    return result


def plot(result: dict, path: Path) -> None:
    models = list(result["models"])
    rows = result["models"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    reads = {
        "follows cue (full image)": [
            rows[m]["effects"]["reads"]["full"]["follows_cue"] for m in models
        ],
        "follows cue (object patches only)": [
            rows[m]["effects"]["reads"]["object_patches_only"]["follows_cue"] for m in models
        ],
        "background swap flips": [rows[m]["effects"]["bg_swap_flip_rate"] for m in models],
        "background share of occlusion effect": [
            rows[m]["effects"]["bg_effect_share"] for m in models
        ],
    }
    width = 0.8 / len(reads)
    for i, (label, values) in enumerate(reads.items()):
        ax.bar([j + i * width for j in range(len(models))], values, width, label=label)
    ax.axhline(0.25, color="k", ls=":", lw=1, label="chance of following the cue (1/4)")
    ax.set(title="what the prediction reads (OOD images)", ylim=(0, 1))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    shares = {f"{n} (rule)": [rows[m]["rule_variants"][n] for m in models] for n in VARIANTS}
    shares.update(
        {
            n: [rows[m]["explainers"][n]["relevance_cue_share"] for m in models]
            for n in EXPLAINERS
            if n != "chefer"
        }
    )
    width = 0.8 / len(shares)
    for i, (label, values) in enumerate(shares.items()):
        ax.bar([j + i * width for j in range(len(models))], values, width, label=label)
    ax.set(title="where the maps put relevance: share on the cue's pixels", ylim=(0, 1))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"{result['benchmark']}, baseline seed {result['baseline_seed']}, fine-tune seed "
        f"{result['seed']}",
        fontsize=10,
    )
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "robustness_mechanism.json"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--baseline-seed", type=int, default=1)
    parser.add_argument("--benchmark", choices=["tint", "marker"], default="tint")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    parser.add_argument(
        "--methods", nargs="+", default=["control", "relreg_label", "energy", "counterfactual"]
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure of --out")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    cfg = yaml.safe_load(args.config.read_text())
    unknown = sorted(set(args.methods) - set(cfg["methods"]))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; the config has {sorted(cfg['methods'])}")
    if args.quick:
        shrink(cfg)
    cfg["baseline_seed"] = args.baseline_seed
    cfg["faithfulness"]["explainers"] = EXPLAINERS
    kind = args.benchmark
    start = time.perf_counter()
    base, stages = build_baseline(cfg, kind, lambda s: print(s, flush=True))
    models = {}
    model = new_model(cfg)
    model.load_state_dict(base)
    models["baseline"] = measure(cfg, model, kind)
    c = cfg["finetune"]
    for name in args.methods:
        torch.manual_seed(args.seed)
        model = new_model(cfg)
        model.load_state_dict(base)
        data = make_split(
            cfg, kind, "finetune", c["per_class"] * cfg["num_classes"], 10 + args.seed
        )
        fit(RelRegModule(model, **cfg["methods"][name]), data, c, args.seed)
        models[name] = measure(cfg, model, kind)
        reads = models[name]["effects"]["reads"]
        print(
            f"{name}: follows cue {reads['full']['follows_cue']:.3f} "
            f"(object patches only {reads['object_patches_only']['follows_cue']:.3f}), "
            f"cue relevance {models[name]['rule_variants']}",
            flush=True,
        )
    result = {
        "machine": machine("cpu"),
        "benchmark": kind,
        "baseline_seed": args.baseline_seed,
        "seed": args.seed,
        "config": cfg,
        "stages": stages,
        "models": models,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
