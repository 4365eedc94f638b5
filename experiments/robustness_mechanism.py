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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import torch
from machine_info import machine  # experiments/machine_info.py (this script's folder)
from robustness_study import (
    DEFAULT_CONFIG,
    build_baseline,
    check_methods,
    cue_region,
    faithfulness,
    fit,
    load_config,
    make_split,
    new_model,
    shrink,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from relreg.explain import (  # noqa: E402
    AttentionCapture,
    explain,
    find_attention_modules,
    to_pixels,
)
from relreg.io import atomic_write  # noqa: E402
from relreg.lightning import RelRegModule  # noqa: E402
from relreg.losses import swap_backgrounds  # noqa: E402
from relreg.viz import save_figure  # noqa: E402

EXPLAINERS = ["chefer", "rollout", "transformer_attribution", "input_x_gradient"]
# how each variant turns attention A and its gradient g, (B, h, N, N), into one (B, N, N) matrix
VARIANTS = {
    "positive_mean": lambda a, g: (g * a).clamp(min=0).mean(1),  # the chefer rule
    "negative_mean": lambda a, g: (g * a).clamp(max=0).neg().mean(1),
    "abs_mean": lambda a, g: (g * a).abs().mean(1),
    "positive_max_head": lambda a, g: (g * a).clamp(min=0).amax(1),
    # A * (g - sum_k A_ik g_ik): the gradient w.r.t. the attention logits, which the value-bias
    # gauge (ValueBiasGauge) does not change
    "positive_mean_logit_grad": lambda a, g: (
        (a * (g - (a * g).sum(-1, keepdim=True))).clamp(min=0).mean(1)
    ),
}


def rule_variants(model: torch.nn.Module, images: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Patch relevance ``(B, N - 1)`` of each :data:`VARIANTS` rule, CLS read-out.

    One forward pass records every block's attention ``A_b: (B, h, N, N)``, one backward pass the
    gradients ``g_b`` of the target logit; each variant reduces ``A_b`` and ``g_b`` over heads to
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
                v = v + torch.bmm(v.unsqueeze(1), reduce(a, g))[:, 0]
            out[name] = v[:, 1:]
    return out


@torch.no_grad()
def value_flow(model: torch.nn.Module, images: Tensor, senders: Tensor) -> dict[str, list[float]]:
    """Per block: how much of what the CLS token and the object's tokens receive comes from ``senders``.

    For receiver ``i`` and head ``h``, the attention output splits into the part from the senders,
    ``sum_{j in S} A_hij v_hj``, and the rest; ``*_value_share`` is the norm of the first over the
    sum of both norms (mean over heads, images and, for ``object``, the object's tokens);
    ``*_attention`` is the attention mass ``sum_{j in S} A_hij`` itself. ``senders``: ``(B, N)``
    bool; the object's tokens are the other non-CLS tokens.
    """
    modules = find_attention_modules(model)
    values: list[Tensor] = []
    hooks = [m.qkv.register_forward_hook(lambda _m, _i, out: values.append(out)) for m in modules]
    try:
        with AttentionCapture(model) as capture:
            model(images)
    finally:
        for h in hooks:
            h.remove()
    s = senders.to(images.dtype)[:, None, None, :]  # (B, 1, 1, N)
    objects = ~senders
    objects[:, 0] = False
    out: dict[str, list[float]] = {k: [] for k in ("cls_attention", "cls_value_share")}
    out.update({"object_attention": [], "object_value_share": []})
    for a, qkv, m in zip(capture.attentions, values, modules, strict=True):
        b, n, _ = qkv.shape
        v = qkv[..., 2 * qkv.shape[-1] // 3 :].reshape(b, n, m.num_heads, -1).transpose(1, 2)
        from_s, from_rest = (a * s) @ v, (a * (1 - s)) @ v  # (B, h, N, d)
        ns, nr = from_s.norm(dim=-1), from_rest.norm(dim=-1)
        share = (ns / (ns + nr).clamp_min(1e-12)).mean(1)  # (B, N)
        mass = (a * s).sum(-1).mean(1)  # (B, N)
        w = objects.to(share.dtype)
        per_image = w.sum(1).clamp_min(1)
        out["cls_attention"].append(round(mass[:, 0].mean().item(), 4))
        out["cls_value_share"].append(round(share[:, 0].mean().item(), 4))
        out["object_attention"].append(round(((mass * w).sum(1) / per_image).mean().item(), 4))
        out["object_value_share"].append(round(((share * w).sum(1) / per_image).mean().item(), 4))
    return out


class ValueBiasGauge:
    """A function-preserving reparametrisation: value bias ``b`` in, ``W_proj b`` out, per block.

    Adding ``b_l`` to every value of block ``l`` adds ``b_l`` to every attention output (each
    attention row sums to 1), and subtracting ``W_proj b_l`` after the output projection removes
    it again, so the network computes the same function for any ``b``. The gradient of a logit
    with respect to the post-softmax attention ``A_ij`` is ``<dy/dout_i, v_j>``: it shifts by
    ``<dy/dout_i, b>``, the same for every ``j`` of row ``i``, so gradient-weighted attention
    rules (``chefer``) depend on ``b``. Used as a context manager, it holds the hooks that apply
    ``self.bias: (blocks, dim)``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = find_attention_modules(model)
        dim = self.modules[0].qkv.out_features // 3
        p = self.modules[0].qkv.weight
        self.bias = torch.zeros(len(self.modules), dim, device=p.device, dtype=p.dtype)
        self.bias.requires_grad_(True)
        self.hooks: list = []

    def __enter__(self) -> ValueBiasGauge:
        for i, m in enumerate(self.modules):
            dim = self.bias.shape[1]

            def shift_values(_m, _i, out: Tensor, i: int = i, dim: int = dim) -> Tensor:
                pad = torch.zeros_like(self.bias[i]).repeat(2)
                return out + torch.cat([pad, self.bias[i]])

            def unshift_output(mod, _i, out: Tensor, i: int = i) -> Tensor:
                return out - mod.weight @ self.bias[i]

            self.hooks.append(m.qkv.register_forward_hook(shift_values))
            self.hooks.append(m.proj.register_forward_hook(unshift_output))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def gauge_shift(
    model: torch.nn.Module, images: Tensor, masks: Tensor, steps: int = 60, lr: float = 0.1
) -> dict[str, float]:
    """Move Chefer relevance onto the object without changing the function (:class:`ValueBiasGauge`).

    Adam on the value-bias gauge only (the weights are untouched), minimising the share of Chefer
    relevance outside ``masks`` (the energy loss) through the second-order maps. Returns the
    background share before and after, and the largest change of any logit (0 up to rounding).
    """
    model.eval()
    with torch.no_grad():
        logits = model(images)
    target = logits.argmax(1)

    def bg_share(maps: Tensor) -> Tensor:
        pix = to_pixels(maps, size=masks.shape[-2:])
        return (pix * (1 - masks)).flatten(1).sum(1) / pix.flatten(1).sum(1).clamp_min(1e-8)

    gauge = ValueBiasGauge(model)
    opt = torch.optim.Adam([gauge.bias], lr=lr)
    with gauge:
        before = bg_share(explain(model, images, "chefer", target=target)).mean().item()
        for _ in range(steps):
            maps = explain(
                model, images, "chefer", target=target, differentiable=True, second_order=True
            )
            loss = bg_share(maps).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            change = (model(images) - logits).abs().max().item()
        after = bg_share(explain(model, images, "chefer", target=target)).mean().item()
    model.train()
    return {
        "bg_share_before": round(before, 4),
        "bg_share_after": round(after, 4),
        "max_logit_change": change,
        "bias_norm": round(gauge.bias.norm().item(), 4),
    }


def cue_share(patches: Tensor, cue: Tensor) -> float:
    """Mean share of ``|relevance|`` on the cue's pixels; ``patches: (B, P)``, ``cue: (B, H, W)``."""
    side = int(patches.shape[1] ** 0.5)
    pix = to_pixels(patches.reshape(-1, side, side), size=cue.shape[-2:]).abs()
    total = pix.flatten(1).sum(1).clamp_min(1e-8)
    return round(((pix * cue).flatten(1).sum(1) / total).mean().item(), 4)


@torch.no_grad()
def patch_keys_values(
    model: torch.nn.Module, images: Tensor, counterfactual: Tensor, senders: Tensor
) -> dict[str, Tensor]:
    """Predictions ``(B,)`` when chosen tokens send the counterfactual's keys and/or values.

    Path patching at every block: a forward hook on each attention's ``qkv`` projection records
    the counterfactual run's keys and values, then, in runs on ``images``, overwrites them for the
    ``senders`` tokens (``(B, N)`` bool): keys only (the tokens change how every token weighs the
    others, through the softmax), values only (what they pass on), or both (everything they send;
    the receivers, CLS included, keep their own queries). Returns the predictions of each run and
    of the plain runs on ``images`` and ``counterfactual``.
    """
    modules = find_attention_modules(model)
    recorded: list[Tensor] = []
    hooks = [m.qkv.register_forward_hook(lambda _m, _i, out: recorded.append(out)) for m in modules]
    try:
        preds = {"counterfactual": model(counterfactual).argmax(1)}
    finally:
        for h in hooks:
            h.remove()
    preds["original"] = model(images).argmax(1)
    dim = recorded[0].shape[-1] // 3
    parts = {"keys": slice(dim, 2 * dim), "values": slice(2 * dim, 3 * dim)}
    for name, slices in (
        ("keys", [parts["keys"]]),
        ("values", [parts["values"]]),
        ("keys_and_values", [parts["keys"], parts["values"]]),
    ):

        def patch(block: int, _m: torch.nn.Module, _i: tuple, out: Tensor, slices=slices) -> Tensor:
            out = out.clone()
            sel = senders.unsqueeze(-1)
            for sl in slices:
                out[..., sl] = torch.where(sel, recorded[block][..., sl], out[..., sl])
            return out

        hooks = [
            m.qkv.register_forward_hook(lambda mod, i, o, b=b: patch(b, mod, i, o))
            for b, m in enumerate(modules)
        ]
        try:
            preds[name] = model(images).argmax(1)
        finally:
            for h in hooks:
                h.remove()
    return preds


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
    # which route does the background take? its tokens send another image's keys and/or values
    fg = data["mask"].unsqueeze(1)
    patch = cfg["model"]["kwargs"]["patch_size"]
    touched = F.max_pool2d(fg, patch).flatten(1) > 0  # (B, P): patches the object touches
    senders = torch.cat([torch.zeros_like(touched[:, :1]), ~touched], 1)  # CLS never sends
    preds = patch_keys_values(
        model, data["image"], swap_backgrounds(data["image"], data["mask"]), senders
    )
    new_cue = data["cue"].roll(1, 0)  # swap_backgrounds: image i gets image i - 1's background
    result["patching"] = {
        name: {
            "flips": round((p != preds["original"]).float().mean().item(), 4),
            "follows_new_cue": round((p == new_cue).float().mean().item(), 4),
        }
        for name, p in preds.items()
        if name != "original"
    }
    result["value_flow"] = value_flow(model, data["image"], senders)
    model.train()
    return result


def plot(result: dict, path: Path) -> None:
    models = list(result["models"])
    rows = result["models"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.2))
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
    ax = axes[2]
    routes = ["counterfactual", "keys_and_values", "keys", "values"]
    width = 0.8 / len(routes)
    for i, route in enumerate(routes):
        values = [rows[m]["patching"][route]["follows_new_cue"] for m in models]
        label = "whole image swapped" if route == "counterfactual" else f"background sends {route}"
        ax.bar([j + i * width for j in range(len(models))], values, width, label=label)
    ax.set(title="background swapped in one route: predictions following the new cue", ylim=(0, 1))
    ax.title.set_fontsize(9)
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
    parser.add_argument("--gauge-n", type=int, default=128, help="OOD images for the gauge test")
    parser.add_argument("--gauge-steps", type=int, default=60, help="Adam steps of the gauge test")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    cfg = load_config(parser, args)
    check_methods(parser, cfg, args.methods)
    if args.quick:
        shrink(cfg)
        args.gauge_n, args.gauge_steps = 8, 2
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
        "gauge": {"n": args.gauge_n, "steps": args.gauge_steps, **gauge},
        "models": models,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
