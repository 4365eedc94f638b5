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
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib
import yaml
from machine_info import machine  # experiments/machine_info.py (this script's folder)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from relreg.data import make_shapes  # noqa: E402
from relreg.explain import explain, to_pixels  # noqa: E402
from relreg.io import atomic_write  # noqa: E402
from relreg.lightning import RelRegModule  # noqa: E402
from relreg.losses import swap_backgrounds  # noqa: E402
from relreg.models import build_model  # noqa: E402
from relreg.viz import save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "study" / "robustness.yaml"
SPLIT_SEEDS = {"unbiased": 1, "bias": 2, "finetune": 3, "id": 4, "ood": 5}
# id / ood / unbiased: accuracy with the cue agreeing 95%, pointing to a wrong class, uninformative;
# on OOD images: Chefer relevance inside the object (mass) and on the cue's pixels, and the share of
# predictions that follow the cue (a shape-only model: 0)
METRICS = ("id_acc", "ood_acc", "unbiased_acc", "relevance_mass", "cue_relevance", "follows_cue")
EVAL_SPLITS = ("id", "ood", "unbiased")


# ------------------------------------------------------------------------------------------ data
def make_split(cfg: dict, kind: str, split: str, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A normalised split of a benchmark as tensors ``image (n, 3, S, S)``, ``mask``, ``label``."""
    k = cfg["num_classes"]
    spurious = {
        "unbiased": 1.0 / k,
        "bias": cfg["bias"]["spurious"],
        "finetune": cfg["finetune"]["spurious"],
        "id": cfg["eval"]["id_spurious"],
        "ood": 0.0,
    }[split]
    batch = make_shapes(
        n,
        size=cfg["image_size"],
        num_classes=k,
        seed=1000 * seed + SPLIT_SEEDS[split],
        spurious=spurious,
        cue=kind,
    )
    return {
        "image": (batch.images - 0.5) / 0.5,
        "mask": batch.masks,
        "label": batch.labels,
        "cue": batch.cues,
    }


# ----------------------------------------------------------------------------------- training
def new_model(cfg: dict) -> torch.nn.Module:
    """The study's (untrained) tiny ViT."""
    return build_model(
        cfg["model"]["name"], False, None, cfg["num_classes"], **cfg["model"]["kwargs"]
    )


def fit(
    module: RelRegModule,
    data: dict[str, torch.Tensor],
    stage: dict,
    seed: int,
    one_cycle: bool = False,
    on_eval: Any = None,
) -> None:
    """Plain AdamW steps of ``module.model_step`` (the same losses ``relreg fit`` trains with).

    ``stage`` holds ``steps``, ``batch_size``, ``lr`` and, with ``on_eval``, ``eval_every``.

    A Trainer per arm would cost seconds of start-up each; the study runs about a hundred arms.
    """
    steps, batch_size, lr = stage["steps"], stage["batch_size"], stage["lr"]
    every = stage.get("eval_every", 0) if on_eval is not None else 0
    g = torch.Generator().manual_seed(seed)
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
        if one_cycle
        else None
    )
    n = data["label"].shape[0]
    order, pos = torch.randperm(n, generator=g), 0
    module.model.train()
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        batch = {key: data[key][idx] for key in ("image", "mask", "label")}
        batch["has_mask"] = torch.ones(idx.numel(), dtype=torch.bool)
        out = module.model_step(batch, relevance=module.lambda_seg > 0, counterfactual=True)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if sched is not None:
            sched.step()
        if every and step % every == 0:
            on_eval(step)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> float:
    was = model.training
    model.eval()
    acc = (model(data["image"]).argmax(1) == data["label"]).float().mean().item()
    model.train(was)
    return acc


def evaluate(model: torch.nn.Module, evals: dict, kind: str, n: int) -> dict[str, float]:
    """The study's :data:`METRICS` of a model; relevance on the first ``n`` OOD images."""
    out = {f"{split}_acc": accuracy(model, evals[split]) for split in EVAL_SPLITS}
    was = model.training
    model.eval()
    ood = {key: value[:n] for key, value in evals["ood"].items()}
    maps = explain(model, ood["image"], "chefer", target=ood["label"])
    pix = to_pixels(maps, size=ood["mask"].shape[-2:])
    total = pix.flatten(1).sum(1).clamp_min(1e-8)
    cue = cue_region(ood["image"], ood["mask"], kind)
    with torch.no_grad():
        pred = model(ood["image"]).argmax(1)
    model.train(was)
    out["relevance_mass"] = ((pix * ood["mask"]).flatten(1).sum(1) / total).mean().item()
    out["cue_relevance"] = ((pix * cue).flatten(1).sum(1) / total).mean().item()
    out["follows_cue"] = (pred == ood["cue"]).float().mean().item()
    return out


def eval_splits(cfg: dict, kind: str) -> dict[str, dict[str, torch.Tensor]]:
    return {
        split: make_split(cfg, kind, split, cfg["eval"]["n"], seed=int(split == "unbiased"))
        for split in EVAL_SPLITS
    }


def build_baseline(cfg: dict, kind: str, log: Any) -> tuple[dict, dict]:
    """Pretrain on unbiased data, then bias; returns the state dict and the stages' accuracies.

    ``cfg["baseline_seed"]`` (default 0) seeds the initialisation and the batch order of both
    stages; their data are fixed.
    """
    seed = cfg.get("baseline_seed", 0)
    torch.manual_seed(seed)
    model = new_model(cfg)
    evals = eval_splits(cfg, kind)
    stages = {}
    for stage, split in (("pretrain", "unbiased"), ("bias", "bias")):
        c = cfg[stage]
        module = RelRegModule(model, lambda_seg=0.0, lambda_cls=1.0, classification="label")
        data = make_split(cfg, kind, split, c["n"])
        fit(module, data, c, seed=seed, one_cycle=stage == "pretrain")
        stages[stage] = {f"{s}_acc": accuracy(model, evals[s]) for s in EVAL_SPLITS}
        log(f"{kind} {stage}: " + ", ".join(f"{k} {v:.3f}" for k, v in stages[stage].items()))
    return copy.deepcopy(model.state_dict()), stages


def finetune(
    cfg: dict,
    base: dict,
    kind: str,
    method: dict,
    seed: int,
    evals: dict,
    per_class: int | None = None,
) -> dict:
    """One arm: the baseline fine-tuned with ``method`` (RelRegModule arguments) for one seed."""
    c = cfg["finetune"]
    per_class = per_class or c["per_class"]
    torch.manual_seed(seed)
    model = new_model(cfg)
    model.load_state_dict(base)
    module = RelRegModule(model, **method)
    data = make_split(cfg, kind, "finetune", per_class * cfg["num_classes"], seed=10 + seed)
    curve = {"steps": [0], "ood_acc": [accuracy(model, evals["ood"])]}

    def on_eval(step: int) -> None:
        curve["steps"].append(step)
        curve["ood_acc"].append(accuracy(model, evals["ood"]))

    start = time.perf_counter()
    fit(module, data, c, seed, on_eval=on_eval)
    seconds = time.perf_counter() - start
    if curve["steps"][-1] != c["steps"]:
        on_eval(c["steps"])
    metrics = evaluate(model, evals, kind, cfg["eval"]["relevance_n"])
    return {**metrics, "curve": curve, "train_s": seconds}


def summarise(runs: list[dict]) -> dict:
    """Mean, (sample) std and per-seed values of each metric, plus the mean OOD curve."""
    out: dict[str, Any] = {}
    for key in METRICS:
        values = [round(r[key], 4) for r in runs]
        out[key] = {
            "mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "per_seed": values,
        }
    if "curve" in runs[0]:
        curves = [r["curve"] for r in runs]
        out["curve"] = {"steps": curves[0]["steps"]}
        cols = list(zip(*(c["ood_acc"] for c in curves), strict=True))
        out["curve"]["ood_acc"] = {
            "mean": [round(statistics.fmean(v), 4) for v in cols],
            "std": [round(statistics.stdev(v), 4) if len(v) > 1 else 0.0 for v in cols],
        }
        out["train_s_per_run"] = round(statistics.fmean(r["train_s"] for r in runs), 2)
    return out


# ------------------------------------------------------------------------------- faithfulness
@torch.no_grad()
def _class_prob(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return model(images).softmax(1).gather(1, target[:, None]).squeeze(1)


@torch.no_grad()
def _class_logit(
    model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    return model(images).gather(1, target[:, None]).squeeze(1)


def cue_region(images: torch.Tensor, masks: torch.Tensor, kind: str) -> torch.Tensor:
    """``(B, H, W)`` where the cue is: the whole background (tint) or the white corner square."""
    if kind == "tint":
        return 1 - masks
    size = images.shape[-1]
    w = size // 8
    white = (images == 1.0).all(1).float()  # 1.0 after normalisation: pure white, only the marker
    corners = torch.zeros_like(masks)
    for r in (0, size - w):
        for c in (0, size - w):
            corners[:, r : r + w, c : c + w] = 1
    return white * corners


def faithfulness(cfg: dict, model: torch.nn.Module, kind: str) -> dict:
    """Where the baseline's maps put relevance against where its prediction reads.

    Interventions on the OOD split, for the predicted class ``c``: the drop of ``p(c)`` (and of
    its logit, ``*_logit_drop``) when the
    background (or the object) is set to the dataset mean (0 after normalisation), and the share
    of predictions that change when the background is swapped for another image's. The maps'
    background share is ``1 - relevance mass``; the cue's share is the relevance on the cue's
    pixels (:func:`cue_region`), against ``cue_occlusion_drop``; ``per_image_corr`` is the Pearson correlation,
    over images, between a map's background share and the drop when the background is occluded.
    ``reads``: the share of predictions that follow the cue (and the shape) when only the patches
    the object touches, or only the object's pixels, are kept.
    """
    model.eval()
    n = cfg["faithfulness"]["n"]
    data = make_split(cfg, kind, "ood", n, seed=2)
    x, m = data["image"], data["mask"]
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    p = logits.softmax(1).gather(1, pred[:, None]).squeeze(1)
    fg = m.unsqueeze(1)
    cue = cue_region(x, m, kind)
    drop_bg = p - _class_prob(model, x * fg, pred)
    drop_fg = p - _class_prob(model, x * (1 - fg), pred)
    drop_cue = p - _class_prob(model, x * (1 - cue.unsqueeze(1)), pred)
    swapped = swap_backgrounds(x, m)
    with torch.no_grad():
        flips = (model(swapped).argmax(1) != pred).float().mean().item()
    pos_bg, pos_fg = drop_bg.clamp_min(0).mean(), drop_fg.clamp_min(0).mean()
    z = logits.gather(1, pred[:, None]).squeeze(1)
    effects = {
        "bg_occlusion_logit_drop": (z - _class_logit(model, x * fg, pred)).mean().item(),
        "cue_occlusion_logit_drop": (z - _class_logit(model, x * (1 - cue.unsqueeze(1)), pred))
        .mean()
        .item(),
        "bg_swap_logit_drop": (z - _class_logit(model, swapped, pred)).mean().item(),
        "bg_occlusion_drop": drop_bg.mean().item(),
        "fg_occlusion_drop": drop_fg.mean().item(),
        "cue_occlusion_drop": drop_cue.mean().item(),
        "bg_effect_share": (pos_bg / (pos_bg + pos_fg).clamp_min(1e-8)).item(),
        "bg_swap_flip_rate": flips,
        "bg_area_share": (1 - m).mean().item(),
        "cue_area_share": cue.mean().item(),
    }
    # Which pixels carry the cue to the prediction? Keep only the patches the object touches (tint
    # at the object's edge included), or only the object's pixels, grey out the rest, and count
    # the predictions that follow the cue against those that follow the shape.
    patch = cfg["model"]["kwargs"]["patch_size"]
    touched = F.max_pool2d(fg, patch)
    touched = F.interpolate(touched, scale_factor=patch, mode="nearest")
    views = {"full": x, "object_patches_only": x * touched, "object_pixels_only": x * fg}
    reads = {}
    with torch.no_grad():
        for view, images in views.items():
            y = model(images).argmax(1)
            reads[view] = {
                "follows_cue": round((y == data["cue"]).float().mean().item(), 4),
                "follows_shape": round((y == data["label"]).float().mean().item(), 4),
            }
    effects["reads"] = reads
    explainers = {}
    for name in cfg["faithfulness"]["explainers"]:
        maps = explain(model, x, name, target=pred)
        pix = to_pixels(maps, size=m.shape[-2:]).clamp_min(0)
        total = pix.flatten(1).sum(1).clamp_min(1e-8)
        bg_share = 1 - (pix * m).flatten(1).sum(1) / total
        cue_share = (pix * cue).flatten(1).sum(1) / total
        corr = torch.corrcoef(torch.stack([bg_share, drop_bg]))[0, 1].item()
        explainers[name] = {
            "relevance_bg_share": round(bg_share.mean().item(), 4),
            "relevance_cue_share": round(cue_share.mean().item(), 4),
            "per_image_corr": round(corr, 4) if corr == corr else None,
        }
    model.train()
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in effects.items()}
    return {"effects": rounded, "explainers": explainers}


# ------------------------------------------------------------------------------------ figures
def plot_curves(result: dict, path: Path) -> None:
    kinds = list(result["benchmarks"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for name, arm in result["benchmarks"][kind].items():
            if "curve" not in arm:
                ax.axhline(arm["ood_acc"]["mean"], color="k", ls=":", label=name)
                continue
            c = arm["curve"]
            mean, std = c["ood_acc"]["mean"], c["ood_acc"]["std"]
            line = ax.plot(c["steps"], mean, marker="o", ms=3, label=name)[0]
            ax.fill_between(
                c["steps"],
                [a - s for a, s in zip(mean, std, strict=True)],
                [a + s for a, s in zip(mean, std, strict=True)],
                color=line.get_color(),
                alpha=0.12,
            )
        ax.set(
            title=f"{kind}: OOD accuracy while fine-tuning (mean ± std over seeds)",
            xlabel="fine-tuning step",
            ylabel="OOD accuracy",
            ylim=(0, 1),
        )
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


def plot_mass(result: dict, path: Path) -> None:
    """Top: relevance mass vs OOD accuracy. Bottom: relevance on the cue vs predictions that
    follow it: a faithful map would rank the arms the same on both axes."""
    kinds = list(result["benchmarks"])
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 8), squeeze=False)
    panels = (
        ("relevance_mass", "ood_acc", "relevance mass inside the object", "OOD accuracy"),
        (
            "cue_relevance",
            "follows_cue",
            "relevance on the cue's pixels",
            "predictions following the cue",
        ),
    )
    for row, (x, y, xlabel, ylabel) in enumerate(panels):
        for ax, kind in zip(axes[row], kinds, strict=True):
            for name, arm in result["benchmarks"][kind].items():
                style = {"marker": "*", "s": 90, "color": "k"} if name == "baseline" else {"s": 18}
                ax.scatter(arm[x]["per_seed"], arm[y]["per_seed"], label=name, **style)
            ax.set(
                title=f"{kind} (OOD images, Chefer maps; one point per seed)",
                xlabel=xlabel,
                ylabel=ylabel,
                ylim=(0, 1),
            )
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, path)


def plot_faithfulness(result: dict, path: Path) -> None:
    kinds = list(result["faithfulness"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        f = result["faithfulness"][kind]
        names = list(f["explainers"])
        xs = range(len(names))
        ax.bar(
            [i - 0.2 for i in xs],
            [f["explainers"][n]["relevance_bg_share"] for n in names],
            width=0.4,
            color="tab:blue",
            label="map: relevance share in the background",
        )
        ax.bar(
            [i + 0.2 for i in xs],
            [f["explainers"][n]["relevance_cue_share"] for n in names],
            width=0.4,
            color="tab:orange",
            label="map: relevance share on the cue's pixels",
        )
        ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=7)
        ax.axhline(
            f["effects"]["bg_effect_share"],
            color="tab:red",
            label="prediction: background share of the occlusion effect",
        )
        ax.axhline(
            f["effects"]["bg_area_share"],
            color="grey",
            ls=":",
            label="background share of the pixels",
        )
        ax.set(
            title=f"{kind} baseline, OOD images: occluding the cue ({f['effects']['cue_area_share']:.1%} "
            f"of pixels) lowers\np(prediction) by {f['effects']['cue_occlusion_drop']:.2f}; "
            f"swapping the background flips {f['effects']['bg_swap_flip_rate']:.0%} of predictions",
            ylim=(0, 1),
        )
        ax.title.set_fontsize(8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2)
    fig.subplots_adjust(bottom=0.36, wspace=0.15)
    save_figure(fig, path)


def plot_sweeps(result: dict, path: Path) -> None:
    sweeps = result.get("sweeps") or {}
    names = [k for k in ("per_class", "weight") if k in sweeps]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        keys = sweeps[name].get("keys", {})
        for i, (method, points) in enumerate(sweeps[name]["results"].items()):
            xs = sorted(points, key=float)
            label = f"{method} ({keys[method]})" if method in keys else method
            for metric, style in (("ood_acc", "-"), ("id_acc", ":")):
                mean = [points[x][metric]["mean"] for x in xs]
                std = [points[x][metric]["std"] for x in xs]
                ax.errorbar(
                    [float(x) for x in xs],
                    mean,
                    yerr=std,
                    marker="o" if metric == "ood_acc" else "x",
                    linestyle=style,
                    color=f"C{i}",
                    capsize=3,
                    label=f"{label}: {metric.split('_')[0].upper()}",
                )
        ax.set_xscale("log")
        ticks = sorted({float(x) for pts in sweeps[name]["results"].values() for x in pts})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set(
            title=f"{sweeps['benchmark']}: accuracy vs {sweeps[name]['label']}",
            xlabel=sweeps[name]["label"],
            ylabel="OOD (solid) and ID (dotted) accuracy",
            ylim=(0, 1),
        )
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_all(result: dict, out: Path) -> None:
    """The study's figures, next to its JSON ``out``."""
    stem = out.with_suffix("")
    plot_curves(result, Path(f"{stem}_ood_vs_steps.png"))
    plot_mass(result, Path(f"{stem}_mass_vs_ood.png"))
    if result["faithfulness"]:
        plot_faithfulness(result, Path(f"{stem}_faithfulness.png"))
    plot_sweeps(result, Path(f"{stem}_sweeps.png"))


# --------------------------------------------------------------------------------------- main
def run(cfg: dict, seeds: list[int], log: Any, sweeps: bool = True, faithful: bool = True) -> dict:
    start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine("cpu"), "seeds": seeds, "config": cfg}
    result["benchmarks"], result["baselines"], result["faithfulness"] = {}, {}, {}
    bases: dict[str, dict] = {}
    methods = cfg["methods"]
    total = len(cfg["benchmarks"]) * len(methods) * len(seeds)
    if sweeps:
        sw = cfg["sweeps"]
        total += len(seeds) * (
            len(sw["per_class"]["methods"]) * len(sw["per_class"]["values"])
            + sum(len(w["values"]) for w in sw["weight"].values())
        )
    bar = tqdm(total=total, desc="fine-tunes", unit="run", disable=None)
    for kind in cfg["benchmarks"]:
        base, stages = build_baseline(cfg, kind, log)
        bases[kind] = base
        evals = eval_splits(cfg, kind)
        model = new_model(cfg)
        model.load_state_dict(base)
        baseline = evaluate(model, evals, kind, cfg["eval"]["relevance_n"])
        result["baselines"][kind] = stages
        arms = {"baseline": summarise([baseline])}
        for name, method in methods.items():
            runs = []
            for seed in seeds:
                runs.append(finetune(cfg, base, kind, method, seed, evals))
                bar.update()
            arms[name] = summarise(runs)
            log(
                f"{kind} {name}: "
                + ", ".join(f"{k} {arms[name][k]['mean']:.3f}" for k in METRICS)
                + f"; OOD per seed {arms[name]['ood_acc']['per_seed']}"
            )
        result["benchmarks"][kind] = arms
        if faithful:
            result["faithfulness"][kind] = faithfulness(cfg, model, kind)
    if sweeps:
        sw = cfg["sweeps"]
        kind = sw["benchmark"]
        evals = eval_splits(cfg, kind)
        default = cfg["finetune"]["per_class"]
        result["sweeps"] = {"benchmark": kind}
        per_class: dict[str, dict] = {}
        for name in sw["per_class"]["methods"]:
            per_class[name] = {str(default): result["benchmarks"][kind][name]}
            for value in sw["per_class"]["values"]:
                runs = []
                for seed in seeds:
                    runs.append(
                        finetune(
                            cfg, bases[kind], kind, methods[name], seed, evals, per_class=value
                        )
                    )
                    bar.update()
                per_class[name][str(value)] = summarise(runs)
        result["sweeps"]["per_class"] = {
            "label": "masked images per class",
            "results": _strip(per_class),
        }
        weight: dict[str, dict] = {}
        for name, spec in sw["weight"].items():
            key = spec["key"]
            weight[name] = {str(methods[name][key]): result["benchmarks"][kind][name]}
            for value in spec["values"]:
                runs = []
                for seed in seeds:
                    runs.append(
                        finetune(cfg, bases[kind], kind, {**methods[name], key: value}, seed, evals)
                    )
                    bar.update()
                weight[name][str(value)] = summarise(runs)
        result["sweeps"]["weight"] = {
            "label": "loss weight (lambda_cls = 1)",
            "keys": {name: spec["key"] for name, spec in sw["weight"].items()},
            "results": _strip(weight),
        }
        log(
            "sweeps: "
            + json.dumps(
                {
                    k: {
                        m: {x: v["ood_acc"]["mean"] for x, v in pts.items()}
                        for m, pts in result["sweeps"][k]["results"].items()
                    }
                    for k in ("per_class", "weight")
                }
            )
        )
    bar.close()
    result["gains"] = {
        kind: {
            name: {
                "ood_minus_control": round(
                    arm["ood_acc"]["mean"] - arms["control"]["ood_acc"]["mean"], 4
                ),
                "id_minus_control": round(
                    arm["id_acc"]["mean"] - arms["control"]["id_acc"]["mean"], 4
                ),
                "ood_gain_every_seed": all(
                    a > b
                    for a, b in zip(
                        arm["ood_acc"]["per_seed"],
                        arms["control"]["ood_acc"]["per_seed"],
                        strict=True,
                    )
                ),
            }
            for name, arm in arms.items()
            if name not in ("control", "baseline")
        }
        for kind, arms in result["benchmarks"].items()
        if "control" in arms
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _strip(points: dict) -> dict:
    return {
        m: {x: {k: v for k, v in s.items() if k in METRICS} for x, s in pts.items()}
        for m, pts in points.items()
    }


def shrink(cfg: dict) -> None:
    """Tiny sizes in place (``--quick``): a smoke test of the whole pipeline, not a result."""
    for stage in ("pretrain", "bias"):
        cfg[stage].update(n=64, steps=4, batch_size=16)
    cfg["finetune"].update(steps=4, eval_every=2, per_class=2)
    cfg["eval"].update(n=16, relevance_n=8)
    cfg["faithfulness"]["n"] = 8
    cfg["sweeps"]["per_class"]["values"] = [1]
    for spec in cfg["sweeps"]["weight"].values():
        spec["values"] = [0.5]


def load_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """``args.config`` as a dict, after refusing to replace an existing ``args.out`` without
    ``args.overwrite`` (exit 2); shared by the robustness scripts."""
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    return yaml.safe_load(args.config.read_text())


def check_methods(parser: argparse.ArgumentParser, cfg: dict, names: list[str]) -> None:
    """Exit 2 naming the ``--methods`` the config does not define."""
    unknown = sorted(set(names) - set(cfg["methods"]))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; the config has {sorted(cfg['methods'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "experiments" / "results" / "robustness_study.json"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--benchmarks", nargs="+", choices=["tint", "marker"], help="default: the config's"
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
        plot_all(json.loads(args.out.read_text()), args.out)
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
    plot_all(result, args.out)
    print(f"wrote {args.out} and figures in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
