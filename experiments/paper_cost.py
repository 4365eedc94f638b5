"""The cost of the paper's protocol per model, counted: FLOPs of a plain and of a relreg step.

For every model of ``configs/paper/`` (random weights, the real architecture, 224 px), counts with
``torch.utils.flop_counter.FlopCounterMode`` the floating-point operations of one image's training
step: ``plain`` (forward + backward of the classification loss) and ``relreg`` (RelRegModule's
step: relevance with the default chunked engine, the RobustViT loss and the classification term,
then the backward pass). Matrix products only (what FlopCounterMode counts), so elementwise work is
left out; the CPU's fused attention kernel, which FlopCounterMode does not know, is counted with
PyTorch's own formulas for fused attention (``sdpa_flop_count``, ``sdpa_backward_flop_count``).
From them: the FLOPs of one epoch of RobustViT's 1,500 training images and of the 50-epoch run,
and the parameter memory of training (fp32 weights, gradients and AdamW's two moments: 16 bytes
per parameter). Writes JSON and a figure.

    python experiments/paper_cost.py --out experiments/results/paper_cost.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from machine_info import machine  # experiments/machine_info.py (this script's folder)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 1500
EPOCHS = 50


def paper_models() -> dict[str, dict]:
    """``{config stem: {"model", "lr", "objective"}}`` of every model file in ``configs/paper/``
    (the files that name a timm model, ``model.model``, other than ``base.yaml``; a loss file such
    as ``cft.yaml`` names none): its timm name, its AdamW
    learning rate and its objective (``base.yaml``'s where the file keeps it)."""
    folder = ROOT / "configs" / "paper"
    base = yaml.safe_load((folder / "base.yaml").read_text())["model"]
    out = {}
    for path in sorted(folder.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if path.stem != "base" and "model" in (config.get("model") or {}):
            model = {**base, **config["model"]}
            out[path.stem] = {
                "model": model["model"],
                "lr": model["optimizer"]["init_args"]["lr"],
                "objective": model["objective"],
            }
    return out


def _cpu_attention_formulas() -> dict:
    """FlopCounterMode formulas for the CPU fused-attention ops, from PyTorch's sdpa formulas."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


def count(name: str, objective: list[dict]) -> dict:
    """FLOPs of one image's plain and relreg training steps, and the parameter count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from relreg.lightning import RelRegModule
    from relreg.objective import StepContext

    torch.manual_seed(0)
    module = RelRegModule(name.split(".")[0], num_classes=1000, objective=objective)
    batch = {
        "image": torch.randn(1, 3, 224, 224),
        "label": torch.zeros(1, dtype=torch.long),
        "mask": torch.zeros(1, 224, 224),
        "has_mask": torch.ones(1, dtype=torch.bool),
    }
    batch["mask"][:, 56:168, 56:168] = 1
    flops = {}
    for case, relevance in (("plain", False), ("relreg", True)):
        module.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
            if relevance:
                out = module.model_step(batch, training=True)
            else:  # the same objective with the maps off: the classification term only
                ctx = StepContext(module.model, batch, module.explainer, False, training=True)
                out = module.objective(ctx)
            out.loss.backward()
        flops[case] = counter.get_total_flops()
    params = sum(p.numel() for p in module.model.parameters())
    return {"params": params, "flops_per_image": flops}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    fig, ax = plt.subplots(figsize=(8, 3.4), constrained_layout=True)
    for i, case in enumerate(("plain", "relreg")):
        vals = [result["models"][n]["flops_per_image"][case] / 1e9 for n in names]
        bars = ax.bar([k + 0.4 * i for k in range(len(names))], vals, 0.4, label=case)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([k + 0.2 for k in range(len(names))], names, fontsize=8)
    ax.set_ylabel("GFLOPs per image, one training step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("the paper's models at 224 px (matrix products, FlopCounterMode)", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="config stems (default: all)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/paper_cost.json"))
    args = parser.parse_args()
    configs = paper_models()
    result = {
        "train_images": TRAIN_IMAGES,
        "epochs": EPOCHS,
        "models": {},
        "machine": machine("cpu"),
    }
    for stem in args.models or list(configs):
        model = configs[stem]
        row = count(model["model"], model["objective"])
        relreg = row["flops_per_image"]["relreg"]
        row.update(
            timm_name=model["model"],
            lr=model["lr"],
            relreg_over_plain=round(relreg / row["flops_per_image"]["plain"], 3),
            epoch_pflops=round(relreg * TRAIN_IMAGES / 1e15, 3),
            run_pflops=round(relreg * TRAIN_IMAGES * EPOCHS / 1e15, 2),
            train_state_gb=round(row["params"] * 16 / 1e9, 2),
        )
        result["models"][stem] = row
        print(
            stem, json.dumps({k: v for k, v in row.items() if k != "flops_per_image"}), flush=True
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
