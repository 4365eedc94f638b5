"""Study: when a relevance loss fails, where does the fine-tuned model still read the cue?

On some baselines of the robustness study (``experiments/robustness_baselines.py``), fine-tuning
with a relevance loss moves Chefer relevance off the tinted background while the model follows the
tint *more* often (RobustViT: Chefer, Schwartz & Wolf, NeurIPS 2022; the rule: Chefer, Gur & Wolf,
ICCV 2021). This script takes one such baseline, fine-tunes it with a few methods (one seed, the
study's protocol) and measures, for the baseline and each fine-tuned model, on OOD images:

- what the prediction reads: the study's faithfulness test (occluding or swapping the background,
  keeping only the patches the object touches or only its pixels; :func:`faithfulness`);
- by which route the background reaches the prediction: its tokens send another image's keys
  and/or values at every block (path patching, :func:`patch_keys_values`);
- how far the map moves with the function held fixed: a value-bias reparametrisation that leaves
  every logit unchanged, optimised to take Chefer relevance off the background
  (:class:`ValueBiasGauge`, :func:`gauge_shift`);
- where the maps put relevance: the share on the cue for several explainers, and for variants of
  the gradient-weighted attention rule that drop one of its choices: positive part only
  (``chefer``), negative part only, absolute value, the maximum over heads instead of the mean, and
  the gradient with respect to the attention logits instead of the probabilities, which the gauge
  above cannot move (:func:`rule_variants`). If one variant kept the background's relevance while
  the others lost it, that choice would be where the cue hides.

    python experiments/robustness_mechanism.py --baseline-seed 1 --benchmark tint \\
        --out experiments/results/robustness_mechanism.json

Writes the JSON and ``*.png`` next to it. About 3 minutes on 2 CPU cores (152 s measured).

The pieces live in the package ``experiments/robustness/``: ``robustness.mechanism`` (the
measurements), ``robustness.protocol`` (the study's protocol) and ``robustness.plots``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine_info import machine  # experiments/machine_info.py (this script's folder)
from robustness.mechanism import EXPLAINERS, gauge_shift, measure
from robustness.plots import plot_mechanism
from robustness.protocol import (
    DEFAULT_CONFIG,
    build_baseline,
    check_methods,
    fit,
    load_config,
    make_split,
    new_model,
    optimisation,
    shrink,
)

from relreg.io import atomic_write
from relreg.lightning import RelRegModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "robustness_mechanism.json"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--baseline-seed", type=int, default=1)
    parser.add_argument("--benchmark", choices=["tint", "marker", "scenes"], default="tint")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    parser.add_argument(
        "--methods", nargs="+", default=["control", "relreg_label", "energy", "counterfactual"]
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure of --out")
    parser.add_argument("--gauge-n", type=int, default=128, help="OOD images for the gauge test")
    parser.add_argument("--gauge-steps", type=int, default=60, help="Adam steps of the gauge test")
    args = parser.parse_args()
    if args.replot:
        plot_mechanism(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    cfg = load_config(parser, args)
    check_methods(parser, cfg, args.methods)
    if args.quick:
        shrink(cfg)
        args.gauge_n = 8
        args.gauge_steps = 2
    cfg["baseline_seed"] = args.baseline_seed
    cfg["faithfulness"]["explainers"] = EXPLAINERS
    kind = args.benchmark
    start = time.perf_counter()
    base, stages = build_baseline(cfg, kind, lambda s: print(s, flush=True))
    models = {}
    model = new_model(cfg)
    model.load_state_dict(base)
    models["baseline"] = measure(cfg, model, kind)
    # how far can the map move with the function held fixed? (the baseline's weights, value gauge)
    data = make_split(cfg, kind, "ood", args.gauge_n, seed=2)
    gauge = gauge_shift(model, data["image"], data["mask"], steps=args.gauge_steps)
    print(f"value-bias gauge on the baseline: {gauge}", flush=True)
    c = cfg["finetune"]
    for name in args.methods:
        torch.manual_seed(args.seed)
        model = new_model(cfg)
        model.load_state_dict(base)
        data = make_split(
            cfg, kind, "finetune", c["per_class"] * cfg["num_classes"], 10 + args.seed
        )
        module = RelRegModule(model, **cfg["methods"][name], **optimisation(c))
        fit(module, data, c, args.seed)
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
        "gauge": {"n": args.gauge_n, "steps": args.gauge_steps, **gauge},
        "models": models,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    plot_mechanism(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
