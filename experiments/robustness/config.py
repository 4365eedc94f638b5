"""The robustness study's config helpers: ``--quick`` sizes, loading with the ``--out`` guard, and
the ``--methods`` check (re-exported by :mod:`robustness.protocol`)."""

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
