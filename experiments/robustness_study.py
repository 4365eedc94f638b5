"""Study: when does relevance fine-tuning raise OOD accuracy on CPU-sized problems, and why not?

RobustViT (Chefer, Schwartz & Wolf, "Optimizing Relevance Maps of Vision Transformers Improves
Robustness", NeurIPS 2022) fine-tunes a pretrained ViT so that its relevance maps sit on the
foreground, and reports higher OOD accuracy. This study reproduces the protocol in minutes on a
CPU, on two spurious-cue benchmarks built from relreg's shapes (:func:`relreg.data.make_shapes`):

- ``tint``: a global cue, the background's colour;
- ``marker``: a local cue, a white square in the class's corner (decoy MNIST, Ross et al. 2017),
  a marker width away from the object.

For each benchmark a tiny ViT first learns the shapes on unbiased data, then the cue on biased
data (the *baseline*: it has the foreground features and leans on the cue, as in the paper). Every
method then fine-tunes the baseline on the same few masked images per class for the same steps:
the CE ``control``, ``relreg`` (RobustViT's loss, first and second order, with the ``self``,
``label`` and ``teacher`` classification terms), the ``energy`` (relevance-mass) loss, ``rrr``
(input-gradient penalty) and ``counterfactual`` (the prediction must not change when the
background is swapped, :mod:`relreg.losses.counterfactual`); each over several seeds. Sweeps vary
the mask budget and the loss weight. A faithfulness test asks, for every explainer, how much
relevance the baseline's maps give the background against how much the prediction moves when only
the background is occluded or swapped.

    python experiments/robustness_study.py --out experiments/results/robustness_study.json

Writes the JSON (``{"benchmarks": {KIND: {METHOD: {"id_acc": {"mean", "std", "per_seed"},
"ood_acc": ..., "relevance_mass": ...}}}, ...}``), and figures next to it (``*_ood_vs_steps.png``,
``*_mass_vs_ood.png``, ``*_faithfulness.png``, ``*_sweeps.png``). The protocol is
``configs/study/robustness.yaml``; about 13 minutes on 2 CPU cores (786 s measured).

The pieces live in the package ``experiments/robustness/``: ``robustness.protocol`` (data,
training, evaluation), ``robustness.study`` (the run), ``robustness.faithfulness`` and
``robustness.plots``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from robustness.plots import plot_study
from robustness.protocol import DEFAULT_CONFIG, ROOT, check_methods, load_config, shrink
from robustness.study import run  # experiments/robustness/ (this script's folder)

from relreg.io import atomic_write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "experiments" / "results" / "robustness_study.json"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        choices=["tint", "marker", "scenes"],
        help="default: the config's",
    )
    parser.add_argument(
        "--methods", nargs="+", help="a subset of the config's methods (control is always run)"
    )
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the config's)")
    parser.add_argument(
        "--baseline-seed",
        type=int,
        help="seed of the baseline's training (initialisation, batch order); default: the config's",
    )
    parser.add_argument("--no-sweeps", action="store_true")
    parser.add_argument("--no-faithfulness", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the figures of an existing --out"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke test, not a result"
    )
    args = parser.parse_args()
    if args.replot:
        plot_study(json.loads(args.out.read_text()), args.out)
        return
    cfg = load_config(parser, args)
    if args.benchmarks:
        cfg["benchmarks"] = args.benchmarks
    if args.methods:
        check_methods(parser, cfg, args.methods)
        keep = {"control", *args.methods}
        cfg["methods"] = {k: v for k, v in cfg["methods"].items() if k in keep}
        sw = cfg["sweeps"]
        sw["per_class"]["methods"] = [m for m in sw["per_class"]["methods"] if m in keep]
        sw["weight"] = {m: spec for m, spec in sw["weight"].items() if m in keep}
    if args.steps:
        cfg["finetune"]["steps"] = args.steps
    if args.baseline_seed is not None:
        cfg["baseline_seed"] = args.baseline_seed
    if args.quick:
        shrink(cfg)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run(
        cfg,
        args.seeds,
        lambda s: print(s, flush=True),
        sweeps=not args.no_sweeps,
        faithful=not args.no_faithfulness,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    plot_study(result, args.out)
    print(f"wrote {args.out} and figures in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
