"""``relreg demo``: the whole fine-tuning job on the built-in CPU benchmark (``make demo``).

Every stage is a LightningCLI run of the YAML files in ``configs/demo``:

1. ``pretrain``: a tiny ViT learns the shapes on unbiased SpuriousShapes;
2. ``bias``: it is fine-tuned on biased data (the background tint agrees with the class 95% of the
   time) so that it also leans on the cue: the *baseline*;
3. for each seed, fine-tunes of the baseline on the same few masked images per class, for the
   same steps: ``control`` (classification term only), ``relreg`` (plus the RobustViT relevance
   loss), ``counterfactual`` (plus the background-counterfactual term instead) and ``relreg_cf``
   (both terms). ``arms=`` picks others among the YAML files of ``configs/demo`` (e.g.
   ``relreg_mass``: the relevance-mass loss).

Each stage leaves ``<stage>/final.ckpt`` (the model exactly as trained and tested; the next stage
starts from it) for ``relreg evaluate``. Writes ``results/demo.json``
(``{"seeds", "arms", "baseline", <arm>...}``, each arm with the mean and per-seed ``id_acc``,
``ood_acc`` and ``relevance_mass`` (the published relevance mass: share of the positive Chefer
relevance inside the masks), fractions in [0, 1]), ``results/ood_heatmaps.png`` (Chefer maps of OOD
images: baseline and each arm, seed 0) and ``results/explainers.png`` (every explainer on the relreg
model, else on the last arm's), all under ``--out``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from relreg.data import SHAPES, SpuriousShapes
from relreg.explain import explain, list_explainers, to_pixels
from relreg.lightning.cli import run_cli
from relreg.viz import explanation_grid, save_figure

__all__ = ["run_demo"]

ARMS = ("control", "relreg", "counterfactual", "relreg_cf")
METRICS = {"id_acc": "test/acc", "ood_acc": "ood/ood/acc", "relevance_mass": "test/relevance_mass"}
_FAST = {"smoothgrad": {"n_samples": 8}, "integrated_gradients": {"steps": 16}}


def _stage(
    configs: Path, out: Path, name: str, extra: list[str], config: str | None = None
) -> tuple[object, dict[str, float]]:
    """Fit one stage (``<config or name>.yaml`` over ``base.yaml``), then test it.

    Returns:
        The CLI object and the test metrics.
    """
    args = ["fit", "--config", str(configs / "base.yaml")]
    args += ["--config", str(configs / f"{config or name}.yaml")]
    args += ["--trainer.default_root_dir", str(out / name)]
    args += ["--trainer.logger.init_args.save_dir", str(out / name)]
    args += ["--trainer.logger.init_args.name", name]
    args += ["--trainer.enable_progress_bar", "false", *extra]
    cli = run_cli(args)
    # the model as trained, whatever step ModelCheckpoint's last.ckpt was saved at
    cli.trainer.save_checkpoint(out / name / "final.ckpt", weights_only=True)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    _finish_wandb()
    merged = {k: float(v) for d in results for k, v in d.items()}
    return cli, {key: round(merged[src], 4) for key, src in METRICS.items()}


def _finish_wandb() -> None:
    """Close the stage's W&B run (Lightning's WandbLogger would log the next stage into it)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def _summary(per_seed: list[dict[str, float]]) -> dict[str, dict]:
    return {
        key: {
            "mean": round(statistics.fmean(r[key] for r in per_seed), 4),
            "per_seed": [r[key] for r in per_seed],
        }
        for key in METRICS
    }


def run_demo(
    out: Path,
    seeds: tuple[int, ...] = (0, 1, 2),
    configs: Path = Path("configs/demo"),
    quick: bool = False,
    arms: tuple[str, ...] = ARMS,
) -> dict:
    """Run the demo; returns what it writes to ``out/results/demo.json``.

    Args:
        out: output folder (checkpoints, offline W&B runs, results).
        seeds: seeds of the control / relreg fine-tunes.
        configs: folder of the demo's YAML files.
        quick: 3 steps per stage (a smoke test, not a result).
        arms: fine-tuning arms, each a ``<arm>.yaml`` in ``configs`` (``control`` first).
    """
    out = Path(out)
    configs = Path(configs)
    if not (configs / "base.yaml").is_file():
        raise FileNotFoundError(
            f"Expected the demo configs in {str(configs)!r} (run from the repository root)."
        )
    missing = [
        a for a in arms if a in ("pretrain", "bias") or not (configs / f"{a}.yaml").is_file()
    ]
    if not arms or missing:
        raise ValueError(
            f"Expected arms among the fine-tuning configs of {str(configs)!r}, "
            f"but got {list(arms)} (not arms: {missing})."
        )
    common = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "1"] if quick else []
    t0 = time.perf_counter()
    cli, _ = _stage(configs, out, "pretrain", common)
    pretrained = str(out / "pretrain" / "final.ckpt")
    cli, baseline = _stage(configs, out, "bias", [*common, "--model.checkpoint", pretrained])
    biased = str(out / "bias" / "final.ckpt")  # the baseline exactly as tested
    models = {"baseline": cli.model.model}
    per_arm: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            extra = [*common, "--model.checkpoint", biased, "--seed_everything", str(seed)]
            extra += [
                "--data.train.init_args.seed",
                str(10 + seed),
                "--data.train.init_args.cache_dir",
                str(out / "data"),
            ]
            cli, metrics = _stage(configs, out, f"{arm}-seed{seed}", extra, config=arm)
            per_arm[arm].append(metrics)
            models.setdefault(arm, cli.model.model)
            print(f"seed {seed} {arm:14s} {metrics}", flush=True)
    result = {
        "seeds": list(seeds),
        "arms": list(arms),
        "baseline": {k: {"mean": v, "per_seed": [v]} for k, v in baseline.items()},
        **{arm: _summary(runs) for arm, runs in per_arm.items()},
        "minutes": round((time.perf_counter() - t0) / 60, 2),
        "quick": quick,
    }
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    _figures(models, results)
    (results / "demo.json").write_text(json.dumps(result, indent=2))
    _print_table(result)
    return result


def _figures(models: dict[str, torch.nn.Module], results: Path) -> None:
    ood = SpuriousShapes("ood", n=6)
    titles = [SHAPES[int(c)] for c in ood.labels]
    shown = (ood.images * 0.5 + 0.5).clamp(0, 1)
    maps = {
        name: to_pixels(
            explain(model.eval(), ood.images, "chefer", target=ood.labels),
            size=ood.images.shape[-2:],
        )
        for name, model in models.items()
    }
    save_figure(explanation_grid(shown, maps, titles), results / "ood_heatmaps.png")
    shown_arm = "relreg" if "relreg" in models else list(models)[-1]
    relreg_model = models[shown_arm]
    every = {
        name: to_pixels(
            explain(relreg_model, ood.images, name, target=ood.labels, **_FAST.get(name, {})),
            size=(32, 32),
        )
        for name in list_explainers()
    }
    figure = explanation_grid(shown, every, titles)
    figure.suptitle(f"every explainer on the {shown_arm} model (seed 0), OOD images", fontsize=9)
    save_figure(figure, results / "explainers.png")


def _print_table(result: dict) -> None:
    print(
        f"\n{'arm':14s} {'id_acc':>8s} {'ood_acc':>8s} {'relevance_mass':>15s}   "
        f"(mean over seeds {result['seeds']})"
    )
    for arm in ("baseline", *result["arms"]):
        row = result[arm]
        print(
            f"{arm:14s} {row['id_acc']['mean']:8.3f} {row['ood_acc']['mean']:8.3f} "
            f"{row['relevance_mass']['mean']:15.3f}"
        )
