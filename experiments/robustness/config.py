"""The robustness study's config helpers: ``--quick`` sizes, loading with the ``--out`` guard, the
``--methods`` check and ``--no-source-task`` (re-exported by :mod:`robustness.protocol`)."""

from __future__ import annotations

import argparse

import yaml


def shrink(cfg: dict) -> None:
    """Tiny sizes in place (``--quick``): a smoke test of the whole pipeline, not a result."""
    for stage in ("pretrain", "bias"):
        cfg[stage].update(n=64, steps=4, batch_size=16)
    cfg["pretrain"].pop("shared", None)  # nothing kept on disk
    cfg["finetune"].update(steps=4, eval_every=2, per_class=2)
    cfg["eval"].update(n=16, relevance_n=8)
    cfg["faithfulness"]["n"] = 8
    cfg["sweeps"]["per_class"]["values"] = [1]
    for spec in cfg["sweeps"]["weight"].values():
        spec["values"] = [0.5]


def load_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """``args.config`` as a dict, after refusing to replace an existing ``args.out``.

    Without ``args.overwrite``, an existing ``args.out`` is a usage error (exit 2); shared by the
    robustness scripts.
    """
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    return yaml.safe_load(args.config.read_text())


def check_methods(parser: argparse.ArgumentParser, cfg: dict, names: list[str]) -> None:
    """Exit 2 naming the ``--methods`` the config does not define."""
    unknown = sorted(set(names) - set(cfg["methods"]))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; the config has {sorted(cfg['methods'])}")


def drop_source_task(parser: argparse.ArgumentParser, cfg: dict, config: object) -> None:
    """``--no-source-task``, in place: pre-train on the task's own classes instead of the config's
    larger source task (removes ``pretrain.num_classes`` and ``pretrain.distractors``; the stage's
    images, steps and schedule stay). Exit 2 when the config's pre-training is no source task."""
    k = cfg["num_classes"]
    if cfg["pretrain"].get("num_classes", k) == k:
        parser.error(
            f"--no-source-task: expected a config whose pretrain stage is a source task "
            f"(pretrain.num_classes > num_classes = {k}), but {config} has none"
        )
    for key in ("num_classes", "distractors"):
        cfg["pretrain"].pop(key, None)
