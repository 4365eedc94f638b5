"""The robustness study's protocol: config, data, model, training, evaluation and summaries.

The benchmarks are relreg's shapes with a spurious cue (:func:`relreg.data.make_shapes`): ``tint``
(the background's colour) or ``marker`` (a white square in the class's corner); and ``scenes``,
real handwritten digits on crops of real photographs, one photograph per class as the cue
(:func:`relreg.data.make_scenes`; training splits draw digits from the ``train`` pool, evaluation
splits from the writer-disjoint ``test`` pool). A tiny ViT learns
the shapes on unbiased data, then the cue on biased data (the baseline, :func:`build_baseline`);
each method fine-tunes it on a few masked images per class (:func:`finetune`), and every model is
scored by :func:`evaluate` (:data:`METRICS`). The protocol's numbers are in
``configs/study/robustness.yaml``.
"""

from __future__ import annotations

import copy
import hashlib
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from relreg.data import make_scenes, make_shapes
from relreg.explain import explain
from relreg.io import atomic_write
from relreg.lightning import RelRegModule
from relreg.metrics import group_accuracy, relevance_share
from relreg.models import build_model
from relreg.quiet import quiet_dependencies
from robustness.config import (  # noqa: F401  (re-exported)
    check_methods,
    drop_source_task,
    load_config,
    shrink,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "study" / "robustness.yaml"
SPLIT_SEEDS = {"unbiased": 1, "bias": 2, "finetune": 3, "id": 4, "ood": 5}
# id / ood / unbiased: accuracy with the cue agreeing 95%, pointing to a wrong class, uninformative;
# on OOD images: Chefer relevance inside the object (mass) and on the cue's pixels, and the share of
# predictions that follow the cue (a shape-only model: 0)
METRICS = (
    "id_acc",
    "ood_acc",
    "unbiased_acc",
    "worst_group_acc",
    "relevance_mass",
    "cue_relevance",
    "follows_cue",
)
EVAL_SPLITS = ("id", "ood", "unbiased")
# the pre-training and biasing stages' objective: cross-entropy to the labels
LABELS_ONLY = [{"term": "classification", "options": {"target": "label"}}]


# ------------------------------------------------------------------------------------------ data
def make_split(
    cfg: dict,
    kind: str,
    split: str,
    n: int,
    seed: int = 0,
    held_out: bool = False,
    num_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """A normalised split of a benchmark.

    Args:
        cfg: the study's config.
        kind: the benchmark, ``"tint"``, ``"marker"`` or ``"scenes"``.
        split: ``"unbiased"``, ``"bias"``, ``"finetune"``, ``"id"`` or ``"ood"`` (how often the
            cue agrees with the label, and the split's seed offset).
        n: number of images.
        seed: the split's seed, ``1000 * seed`` plus the split's offset.
        held_out: an evaluation split (``scenes``: digits from the writer-disjoint test pool).
        num_classes: classes of the split (default: the config's; a source task may have more).

    Returns:
        ``image (n, 3, S, S)`` in [-1, 1], ``mask (n, S, S)`` in {0, 1}, ``label (n,)`` and
        ``cue (n,)``, the class the cue points to.
    """
    k = num_classes or cfg["num_classes"]
    spurious = {
        "unbiased": 1.0 / k,
        "bias": cfg["bias"]["spurious"],
        "finetune": cfg["finetune"]["spurious"],
        "id": cfg["eval"]["id_spurious"],
        "ood": 0.0,
    }[split]
    common = dict(size=cfg["image_size"], num_classes=k, seed=1000 * seed + SPLIT_SEEDS[split])
    if kind == "scenes":
        opts = dict(cfg.get("scenes", {}))
        if split == "unbiased" and not held_out:  # the source task's extra backgrounds
            opts["distractors"] = cfg["pretrain"].get("distractors", 0)
        digits = "test" if held_out else "train"
        batch = make_scenes(n, spurious=spurious, digits=digits, **opts, **common)
    else:
        batch = make_shapes(n, spurious=spurious, cue=kind, **common)
    return {
        "image": (batch.images - 0.5) / 0.5,
        "mask": batch.masks,
        "label": batch.labels,
        "cue": batch.cues,
    }


def cue_region(images: torch.Tensor, masks: torch.Tensor, kind: str) -> torch.Tensor:
    """``(B, H, W)`` in {0, 1} where the cue is: the background (tint, scenes) or the marker."""
    if kind in ("tint", "scenes"):
        return 1 - masks
    size = images.shape[-1]
    w = size // 8
    white = (images == 1.0).all(1).float()  # 1.0 after normalisation: pure white, only the marker
    corners = torch.zeros_like(masks)
    for r in (0, size - w):
        for c in (0, size - w):
            corners[:, r : r + w, c : c + w] = 1
    return white * corners


# ----------------------------------------------------------------------------------- training
def new_model(cfg: dict, num_classes: int | None = None) -> torch.nn.Module:
    """The study's (untrained) tiny ViT, with the config's classes or ``num_classes``."""
    k = num_classes or cfg["num_classes"]
    return build_model(cfg["model"]["name"], False, None, k, **cfg["model"]["kwargs"])


def keep_classes(model: torch.nn.Module, k: int) -> torch.nn.Module:
    """Cut a source model's head to its first ``k`` classes, in place (the target task's)."""
    head = model.get_classifier()
    small = torch.nn.Linear(head.in_features, k)
    with torch.no_grad():
        small.weight.copy_(head.weight[:k])
        small.bias.copy_(head.bias[:k])
    model.head = small
    model.num_classes = k
    return model


def term_weight(method: dict, term: str) -> float:
    """The weight of ``term`` in an arm's objective (an arm of the config's ``methods``)."""
    for spec in method["objective"]:
        if spec["term"] == term:
            return float(spec.get("weight", 1.0))
    raise ValueError(f"Expected a {term!r} term in the arm's objective, but got {method!r}.")


def with_weight(method: dict, term: str, weight: float) -> dict:
    """A copy of an arm with the weight of its ``term`` set to ``weight``."""
    term_weight(method, term)  # the arm has the term
    objective = [
        {**spec, "weight": weight} if spec["term"] == term else spec for spec in method["objective"]
    ]
    return {**method, "objective": objective}


class _Batches(torch.utils.data.Dataset):
    """The study's batches in order: a fresh permutation of the split whenever the next batch
    would run past its end (seeded, so each arm sees the same order)."""

    def __init__(self, data: dict[str, torch.Tensor], steps: int, batch_size: int, seed: int):
        self.data = data
        g = torch.Generator().manual_seed(seed)
        n = data["label"].shape[0]
        order = torch.randperm(n, generator=g)
        pos = 0
        self.indices = []
        for _ in range(steps):
            if pos + batch_size > n:
                order = torch.randperm(n, generator=g)
                pos = 0
            self.indices.append(order[pos : pos + batch_size])
            pos += batch_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        idx = self.indices[step]
        keys = ("image", "mask", "label") + (("group",) if "group" in self.data else ())
        batch = {key: self.data[key][idx] for key in keys}
        batch["has_mask"] = torch.ones(idx.numel(), dtype=torch.bool)
        return batch


class _EveryNSteps(pl.Callback):
    """Calls ``on_eval(step)`` after every ``every``-th optimiser step."""

    def __init__(self, every: int, on_eval: Any) -> None:
        self.every = every
        self.on_eval = on_eval

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self.on_eval(trainer.global_step)


def optimisation(stage: dict, one_cycle: bool = False) -> dict[str, Any]:
    """A stage's optimiser and schedule as :class:`relreg.lightning.RelRegModule` arguments:
    AdamW (weight decay 1e-4) at ``stage["lr"]``, constant or one-cycle over ``stage["steps"]``
    (stepped after every optimiser step)."""
    lr = stage["lr"]
    steps = stage["steps"]

    def scheduler(opt: torch.optim.Optimizer) -> dict[str, Any]:
        if one_cycle:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return {"scheduler": sched, "interval": "step"}

    return {
        "optimizer": partial(torch.optim.AdamW, lr=lr, weight_decay=1e-4),
        "scheduler": scheduler,
    }


def fit(
    module: RelRegModule, data: dict[str, torch.Tensor], stage: dict, seed: int, on_eval: Any = None
) -> None:
    """Train ``module`` with Lightning through its own training step (``relreg fit``'s path).

    No logger, checkpoints or validation: the study scores the models itself.

    Args:
        module: the model, its objective and its optimisation (:func:`optimisation`).
        data: a split from :func:`make_split` (every image has a mask).
        stage: ``steps``, ``batch_size`` and, with ``on_eval``, ``eval_every``.
        seed: seeds the batch order.
        on_eval: called with the step number every ``eval_every`` steps.
    """
    batches = _Batches(data, stage["steps"], stage["batch_size"], seed)
    # generator: the loader's own seed is drawn from it, not from torch's global generator
    loader = DataLoader(batches, batch_size=None, generator=torch.Generator())
    every = stage.get("eval_every", 0) if on_eval is not None else 0
    trainer = pl.Trainer(
        accelerator="cpu",  # the study's splits and scores stay on the CPU
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[_EveryNSteps(every, on_eval)] if every else [],
    )
    with quiet_dependencies(stages=True):
        trainer.fit(module, train_dataloaders=loader)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> float:
    """Top-1 accuracy of ``model`` (in eval mode, restored after) on a split."""
    was = model.training
    model.eval()
    acc = (model(data["image"]).argmax(1) == data["label"]).float().mean().item()
    model.train(was)
    return acc


def evaluate(model: torch.nn.Module, evals: dict, kind: str, n: int) -> dict[str, float]:
    """The study's :data:`METRICS` of a model.

    Args:
        model: the model to score.
        evals: the splits of :func:`eval_splits`.
        kind: the benchmark.
        n: the relevance metrics use the first ``n`` OOD images (Chefer maps of the label).

    Returns:
        ``{metric: value}``; ``relevance_mass`` and ``cue_relevance`` are the mean shares
        (:func:`relreg.metrics.relevance_share`) in the object and on the cue's pixels.
    """
    out = {f"{split}_acc": accuracy(model, evals[split]) for split in EVAL_SPLITS}
    was = model.training
    model.eval()
    unbiased = evals["unbiased"]
    with torch.no_grad():
        logits = model(unbiased["image"])
    k = logits.shape[1]
    groups = unbiased["label"] * k + unbiased["cue"]  # label x the class the cue points to
    out["worst_group_acc"] = group_accuracy(logits, unbiased["label"], groups, k * k)[
        "worst_group_accuracy"
    ].item()
    ood = {key: value[:n] for key, value in evals["ood"].items()}
    maps = explain(model, ood["image"], "chefer", target=ood["label"])
    cue = cue_region(ood["image"], ood["mask"], kind)
    with torch.no_grad():
        pred = model(ood["image"]).argmax(1)
    model.train(was)
    out["relevance_mass"] = relevance_share(maps, ood["mask"]).mean().item()
    out["cue_relevance"] = relevance_share(maps, cue).mean().item()
    out["follows_cue"] = (pred == ood["cue"]).float().mean().item()
    return out


def eval_splits(cfg: dict, kind: str) -> dict[str, dict[str, torch.Tensor]]:
    """The :data:`EVAL_SPLITS` of a benchmark, ``cfg["eval"]["n"]`` images each."""
    n = cfg["eval"]["n"]
    return {
        split: make_split(cfg, kind, split, n, seed=int(split == "unbiased"), held_out=True)
        for split in EVAL_SPLITS
    }


def build_baseline(cfg: dict, kind: str, log: Any) -> tuple[dict, dict]:
    """Pretrain on unbiased data, then bias.

    Args:
        cfg: the study's config; ``cfg["baseline_seed"]`` (default 0) seeds the initialisation and
            the batch order of both stages; their data are fixed.
        kind: the benchmark.
        log: called with a line per stage.

    Returns:
        The baseline's state dict and each stage's accuracies.
    """
    seed = cfg.get("baseline_seed", 0)
    evals = eval_splits(cfg, kind)
    stages = {}
    model = _pretrained(cfg, kind, seed, log)
    stages["pretrain"] = {f"{s}_acc": accuracy(model, evals[s]) for s in EVAL_SPLITS}
    log(f"{kind} pretrain: " + ", ".join(f"{k} {v:.3f}" for k, v in stages["pretrain"].items()))
    torch.manual_seed(seed)  # the biasing stage's randomness does not depend on the cache
    module = RelRegModule(model, objective=LABELS_ONLY, **optimisation(cfg["bias"]))
    # with a shared source model, each baseline also draws its own biased data
    data_seed = seed if cfg["pretrain"].get("shared") else 0
    data = make_split(cfg, kind, "bias", cfg["bias"]["n"], seed=data_seed)
    fit(module, data, cfg["bias"], seed=seed)
    stages["bias"] = {f"{s}_acc": accuracy(model, evals[s]) for s in EVAL_SPLITS}
    log(f"{kind} bias: " + ", ".join(f"{k} {v:.3f}" for k, v in stages["bias"].items()))
    return copy.deepcopy(model.state_dict()), stages


_SOURCES: dict[str, dict] = {}  # shared pretrained source models, by their stage's settings


def _code_fingerprint() -> str:
    """What a cached source model depends on beyond its settings: the data and training code and
    the libraries' versions (a change of any retrains it)."""
    import importlib.metadata as md

    files = ["relreg/data/scenes.py", "relreg/data/scene_sources.py", "relreg/data/synthetic.py"]
    h = hashlib.sha1(Path(__file__).read_bytes())
    for name in files:
        h.update((ROOT / name).read_bytes())
    for package in ("torch", "timm", "scikit-image", "scikit-learn", "numpy"):
        try:
            h.update(f"{package}={md.version(package)}".encode())
        except md.PackageNotFoundError:
            h.update(f"{package}=none".encode())
    return h.hexdigest()[:16]


def _pretrained(cfg: dict, kind: str, seed: int, log: Any) -> torch.nn.Module:
    """Stage 1 on unbiased data. ``pretrain.num_classes`` > the task's makes it a source task
    (more digits, all backgrounds at random) whose head is then cut to the task's classes;
    ``pretrain.shared`` trains it once (seed 0) for every baseline seed, as one pretrained
    checkpoint serves many fine-tunes, and keeps it in ``runs/study_sources/`` (keyed by the
    stage's settings) for later runs on the same machine."""
    c = cfg["pretrain"]
    k = c.get("num_classes", cfg["num_classes"])
    seed = 0 if c.get("shared") else seed
    key = repr(
        (kind, seed, sorted(c.items()), cfg["model"], cfg.get("scenes"), cfg["image_size"])
        + (cfg["num_classes"], _code_fingerprint())
    )
    cache = ROOT / "runs" / "study_sources" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    if key not in _SOURCES and c.get("shared") and cache.is_file():  # a shared source, trained once
        _SOURCES[key] = torch.load(cache, weights_only=True)
        log(f"{kind} source model from {cache.relative_to(ROOT)} (same settings, code, versions)")
    if key not in _SOURCES:
        torch.manual_seed(seed)
        model = new_model(cfg, k)
        module = RelRegModule(model, objective=LABELS_ONLY, **optimisation(c, one_cycle=True))
        data = make_split(cfg, kind, "unbiased", c["n"], num_classes=k)
        start = time.perf_counter()
        fit(module, data, c, seed=seed)
        if k != cfg["num_classes"]:
            src = make_split(
                cfg, kind, "unbiased", cfg["eval"]["n"], seed=1, held_out=True, num_classes=k
            )
            log(
                f"{kind} source task ({k} classes): unbiased_acc {accuracy(model, src):.3f}, "
                f"{time.perf_counter() - start:.0f} s"
            )
            keep_classes(model, cfg["num_classes"])
        _SOURCES[key] = copy.deepcopy(model.state_dict())
        if c.get("shared"):
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, lambda tmp: torch.save(_SOURCES[key], tmp))
    model = new_model(cfg)
    model.load_state_dict(_SOURCES[key])
    return model


def balanced_split(cfg: dict, kind: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """About ``n`` images of the task with every group (label x the class the cue points to)
    equally often (``n`` rounded down to a multiple of the groups, at least one image each),
    drawn from an unbiased pool of the fine-tuning digits: the group-balanced held-out set of the
    DFR, GroupDRO and data-oracle arms (``data: balanced``), with ``group``."""
    k = cfg["num_classes"]
    per_group = max(1, n // (k * k))
    no_source = {**cfg, "pretrain": {**cfg["pretrain"], "distractors": 0}}
    pool = make_split(no_source, kind, "unbiased", 8 * per_group * k * k, seed=20 + seed)
    groups = pool["label"] * k + pool["cue"]
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for group in range(k * k):
        members = torch.nonzero(groups == group).flatten()
        if len(members) < per_group:
            raise ValueError(f"Expected {per_group} images of group {group} in the pool.")
        chosen.append(members[torch.randperm(len(members), generator=g)[:per_group]])
    idx = torch.cat(chosen)
    return {**{key: value[idx] for key, value in pool.items()}, "group": groups[idx]}


class _Split(torch.utils.data.Dataset):
    """A split's tensors as :class:`relreg.data.Sample` dicts (for DFR's embeddings)."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["label"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.data["image"][i], "label": self.data["label"][i],
                "group": self.data["group"][i]}  # fmt: skip


def dfr_arm(cfg: dict, base: dict, kind: str, seed: int, evals: dict, per_class: int) -> dict:
    """The DFR arm: the baseline's head retrained by DFR^Val
    (:func:`relreg.baselines.deep_feature_reweighting`) on the group-balanced held-out set of
    the recipes' image budget; the rest of the model as it was."""
    from relreg.baselines import deep_feature_reweighting

    torch.manual_seed(seed)
    model = new_model(cfg)
    model.load_state_dict(base)
    held_out = balanced_split(cfg, kind, per_class * cfg["num_classes"], seed)
    curve = {"steps": [0], "ood_acc": [accuracy(model, evals["ood"])]}
    start = time.perf_counter()
    result = deep_feature_reweighting(model, _Split(held_out), seed=seed)
    seconds = time.perf_counter() - start
    curve["steps"].append(cfg["finetune"]["steps"])
    curve["ood_acc"].append(accuracy(model, evals["ood"]))
    metrics = evaluate(model, evals, kind, cfg["eval"]["relevance_n"])
    return {**metrics, "curve": curve, "train_s": seconds, "dfr_c": result.c}


def made_masks(
    cfg: dict, kind: str, images: torch.Tensor, method: str = "tokencut", **options: Any
) -> torch.Tensor:
    """Masks made for ``images`` without their true masks, as a user without masks makes them:
    TokenCut (:class:`relreg.masks.TokenCut`) on the keys of the benchmark's source model, the
    supervised model of stage 1 before any cue was taught (an arm's ``masks: {method: tokencut}``).

    Args:
        images: ``(n, 3, S, S)`` in [-1, 1] (:func:`make_split`).
        options: :class:`~relreg.masks.TokenCut` options (``tau``, ``features``, ``refine``).

    Returns:
        ``(n, S, S)`` float masks in {0, 1}.
    """
    from relreg.masks import TokenCut

    if method != "tokencut":
        raise ValueError(f"Expected masks.method 'tokencut' in the study, but got {method!r}.")
    source = _pretrained(cfg, kind, 0, lambda *_: None)
    segment = TokenCut(source, **options)
    pixels = ((images * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    return torch.stack(segment(list(pixels))).float()


def finetune(
    cfg: dict,
    base: dict,
    kind: str,
    method: dict,
    seed: int,
    evals: dict,
    per_class: int | None = None,
) -> dict:
    """One arm: the baseline fine-tuned with ``method`` for one seed.

    Args:
        cfg: the study's config (``cfg["finetune"]``: the stage).
        base: the baseline's state dict.
        kind: the benchmark.
        method: :class:`relreg.lightning.RelRegModule` arguments.
        seed: seeds the initialisation's RNG, the fine-tuning data and the batch order.
        evals: the splits of :func:`eval_splits`.
        per_class: masked images per class (default: the config's).

    ``method`` may also hold ``masks`` (:func:`made_masks`), ``data: balanced`` (train on the
    group-balanced held-out set of :func:`balanced_split` instead of the biased fine-tuning set)
    and ``stage: dfr`` (:func:`dfr_arm` instead of fine-tuning).

    Returns:
        :func:`evaluate`'s metrics, the OOD ``curve`` while fine-tuning and ``train_s``.
    """
    c = cfg["finetune"]
    per_class = per_class or c["per_class"]
    method = dict(method)
    made = method.pop("masks", None)
    source = method.pop("data", "finetune")
    if method.pop("stage", None) == "dfr":
        return dfr_arm(cfg, base, kind, seed, evals, per_class)
    torch.manual_seed(seed)
    model = new_model(cfg)
    model.load_state_dict(base)
    module = RelRegModule(model, **method, **optimisation(c))
    if source == "balanced":
        data = balanced_split(cfg, kind, per_class * cfg["num_classes"], seed)
    else:
        data = make_split(cfg, kind, "finetune", per_class * cfg["num_classes"], seed=10 + seed)
    if made is not None:
        data = {**data, "mask": made_masks(cfg, kind, data["image"], **made)}
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
    """Mean, (sample) std and per-seed values of each metric, plus the mean OOD curve.

    Args:
        runs: one :func:`finetune` (or :func:`evaluate`) result per seed.

    Returns:
        ``{metric: {"mean", "std", "per_seed"}}``, with ``curve`` and ``train_s_per_run`` when
        the runs have curves.
    """
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
