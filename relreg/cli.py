"""The ``relreg`` command: :func:`main` parses the command line and calls the library
(LightningCLI for ``fit|validate|test|predict``, :mod:`relreg.evaluation` for ``evaluate``, ...).
``relreg --help`` lists the commands (:data:`DESCRIPTION`); ``relreg COMMAND --help`` gives the
options of each.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from relreg.io import atomic_write
from relreg.quiet import quiet_dependencies

__all__ = ["DESCRIPTION", "LIGHTNING_COMMANDS", "main"]

# the Lightning trainer's commands, run by relreg.lightning.cli (LightningCLI)
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

DESCRIPTION = """\
Relevance maps and relevance-regularised fine-tuning of timm vision transformers.

  relreg fit|validate|test|predict --config FILE.yaml
      the fine-tuning job (LightningCLI; 'relreg fit --help' lists its options)
  relreg explain IMAGE ... --model NAME
      relevance heatmaps of image files
  relreg evaluate --checkpoint A.ckpt [B.ckpt] --data SPLIT --out DIR
      explanation quality and OOD accuracy of checkpoints: report.json and figures
  relreg demo
      the whole job on the built-in CPU benchmark
  relreg prepare imagenet-s --masks M --images I --out O
      RobustViT's ImageNet-S subsets as image folders
  relreg masks --images DIR --out DIR --method tokencut|clipseg|sam3
      foreground masks for images that have none, in the layout the fit configs read
  relreg dfr --checkpoint A.ckpt --data WATERBIRDS --out DFR.pt
      DFR: the head retrained on a group-balanced held-out set (Waterbirds' validation split)

Run 'relreg COMMAND --help' for the options of each command.
"""

_LIGHTNING_HELP = {
    "fit": "fine-tune a model (LightningCLI: --config FILE.yaml; relreg fit --help)",
    "validate": "validate a model on the validation split (LightningCLI; relreg validate --help)",
    "test": "test a model on the test and OOD splits (LightningCLI; relreg test --help)",
    "predict": "predict with a model (LightningCLI; relreg predict --help)",
}


def _lightning_parsers(sub: argparse._SubParsersAction) -> None:
    """List the Lightning commands in ``relreg --help``; they are parsed by LightningCLI."""
    for command in LIGHTNING_COMMANDS:
        sub.add_parser(command, help=_LIGHTNING_HELP[command], add_help=False)


def _explain_parser(sub: argparse._SubParsersAction) -> None:
    from relreg.explain import list_explainers

    p = sub.add_parser(
        "explain", help="write relevance heatmaps (PNG overlay + raw .npy) for image files"
    )
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    p.add_argument("--model", required=True, help="timm model name, e.g. vit_base_patch16_224")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument(
        "--checkpoint", type=Path, help="local weights file (state_dict, .safetensors, Lightning)"
    )
    weights.add_argument(
        "--pretrained", action="store_true", help="timm's pretrained weights (needs network)"
    )
    p.add_argument(
        "--num-classes", type=int, default=None, help="classifier size (default: the model's)"
    )
    p.add_argument(
        "--img-size", type=int, default=None, help="model input size (default: the model's)"
    )
    p.add_argument("--patch-size", type=int, default=None, help="patch size (default: the model's)")
    p.add_argument("--method", default="chefer", choices=list_explainers())
    p.add_argument("--target", type=int, default=None, help="class to explain (default: top-1)")
    p.add_argument(
        "--foil", type=int, default=None, help="contrast class: explain target minus foil"
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the whole fine-tuning job on the built-in CPU benchmark (configs/demo)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the fine-tunes"
    )
    p.add_argument(
        "--configs", type=Path, default=Path("configs/demo"), help="folder of the demo configs"
    )
    p.add_argument(
        "--quick", action="store_true", help="3 steps per stage: a smoke test, not a result"
    )
    p.add_argument("--arms", nargs="+", help="fine-tuning arms (configs/demo/<arm>.yaml)")


def _prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="RobustViT's ImageNet-S train/val subsets as image folders")
    p.add_argument("dataset", choices=("imagenet-s",))
    p.add_argument("--masks", type=Path, required=True, help="ImageNet-S masks: <wnid>/<name>.png")
    p.add_argument("--images", type=Path, required=True, help="ImageNet train: <wnid>/<name>.JPEG")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/train and OUT/val")
    p.add_argument("--train-classes", type=int, default=500)
    p.add_argument("--per-class", type=int, default=None, help="default: 3 train, 1 val")
    p.add_argument("--class-seed", type=int, default=None, help="shuffle the sorted classes")
    p.add_argument("--copy", action="store_true", help="copy files instead of linking them")


def _masks_parser(sub: argparse._SubParsersAction) -> None:
    from relreg.masks import list_mask_methods

    p = sub.add_parser(
        "masks",
        help="foreground masks for an image folder (TokenCut, CLIPSeg, SAM 3): OUT/images, "
        "OUT/masks and OUT/masks_summary.json, resumable",
    )
    p.add_argument("--images", type=Path, required=True, help="image folders <class>/<image>")
    p.add_argument("--out", type=Path, required=True, help="output root (its parent must exist)")
    p.add_argument("--method", default="tokencut", choices=list_mask_methods())
    p.add_argument("--model", default=None, help="timm (tokencut) or Hugging Face model name")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="tokencut: local weights for --model, or a relreg fit checkpoint",
    )
    p.add_argument("--per-class", type=int, default=None, help="masks per class (RobustViT: 3)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images in all")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class choice")
    p.add_argument(
        "--prompt", default="a photo of a {}", help="text prompt template ({} = class name)"
    )
    p.add_argument("--threshold", type=float, default=None, help="clipseg/sam3 score threshold")
    p.add_argument("--refine", action="store_true", help="tokencut: bilateral solver (SciPy)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    p.add_argument("--overwrite", action="store_true", help="make existing masks again")


def _mask_options(args: argparse.Namespace) -> dict:
    """The method's factory options from the command line (only those given)."""
    options: dict = {"device": args.device}
    if args.model is not None:
        options["model"] = args.model
    if args.checkpoint is not None:
        if args.method != "tokencut":
            raise ValueError(
                f"Expected --checkpoint only with --method tokencut, not {args.method} "
                "(give the Hugging Face model's name or folder to --model)."
            )
        options["checkpoint"] = args.checkpoint
    if args.threshold is not None:
        if args.method == "tokencut":
            raise ValueError("Expected --threshold only with --method clipseg or sam3.")
        options["threshold"] = args.threshold
    if args.refine:
        if args.method != "tokencut":
            raise ValueError(f"Expected --refine only with --method tokencut, not {args.method}.")
        options["refine"] = True
    return options


def _dfr_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dfr",
        help="DFR^Val after relreg fit: retrain the head on Waterbirds' validation split, "
        "score the test split before and after",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a relreg fit checkpoint")
    p.add_argument("--data", type=Path, required=True, help="Waterbirds' root (metadata.csv)")
    p.add_argument("--out", type=Path, required=True, help="the new weights (state_dict)")
    p.add_argument("--num-retrains", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    from relreg.explain import list_explainers

    p = sub.add_parser(
        "evaluate",
        help="explanation quality (perturbation, deletion/insertion, segmentation, pointing game) "
        "and OOD accuracy of checkpoints: report.json + figures",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        default=[],
        help="one or more weights files (two: a before/after comparison); relreg fit checkpoints "
        "carry their architecture, so --model may be left out",
    )
    p.add_argument("--labels", nargs="+", default=None, help="names of the checkpoints in figures")
    p.add_argument("--pretrained", action="store_true", help="also evaluate timm's weights")
    p.add_argument("--model", default=None, help="timm model name (default: from the checkpoint)")
    p.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help="JSON keyword arguments of timm.create_model, e.g. '{\"img_size\": 32}'",
    )
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument(
        "--data",
        required=True,
        help="masked split: a folder with images/<class>/ and masks/<class>/, or shapes:SPLIT[:N]",
    )
    p.add_argument(
        "--ood",
        nargs="+",
        default=[],
        metavar="NAME=SPEC",
        help="OOD splits for accuracy: NAME=FOLDER (<class>/<image>) or NAME=shapes:ood",
    )
    p.add_argument("--classes", default=None, help="label space file (one class name per line)")
    p.add_argument("--scoring", choices=("argmax", "restricted"), default="argmax")
    p.add_argument(
        "--preprocessing",
        choices=("model", "robustvit"),
        default="model",
        help="the model's timm pretrained_cfg, or resize 256 / crop 224, mean = std = 0.5",
    )
    p.add_argument(
        "--methods", nargs="+", default=["chefer", "rollout", "gradcam"], choices=list_explainers()
    )
    p.add_argument("--unit", choices=("pixel", "patch"), default="pixel")
    p.add_argument("--target", choices=("predicted", "label"), default="predicted")
    p.add_argument("--steps", type=int, default=10, help="deletion/insertion steps")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-heatmaps", type=int, default=6, help="rows of heatmaps.png (0: none)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument(
        "--sanity",
        action="store_true",
        help="model-randomisation sanity checks on the first batch (Adebayo et al.)",
    )


def _load_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"Expected an image file, but {str(path)!r} does not exist.")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Could not read {str(path)!r} as an image: {err}") from err


def run_explain(args: argparse.Namespace) -> list[Path]:
    """``relreg explain``: returns the files written."""
    import timm.data

    from relreg.data import class_names
    from relreg.explain import explain_with_logits, to_pixels
    from relreg.models import build_model
    from relreg.viz import explanation_title, overlay_figure, save_figure

    if args.batch_size < 1:
        raise ValueError(f"Expected --batch-size >= 1, but got {args.batch_size}.")
    kwargs = {
        k: v
        for k, v in (("img_size", args.img_size), ("patch_size", args.patch_size))
        if v is not None
    }
    if args.checkpoint is None and not args.pretrained:
        warnings.warn(
            f"relreg explain: neither --checkpoint nor --pretrained was given, so the maps explain "
            f"a randomly initialised {args.model}; pass --pretrained (timm's weights) or "
            "--checkpoint FILE.",
            UserWarning,
            stacklevel=2,
        )
    model = build_model(
        args.model, args.pretrained, args.checkpoint, args.num_classes, **kwargs
    ).to(args.device)
    config = timm.data.resolve_model_data_config(model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # the model's own size, which --img-size may have changed
        config["input_size"] = (3, *img_size)
    transform = timm.data.create_transform(**config)
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    pil = [_load_image(p) for p in args.images]  # fail on a bad file before writing anything
    stems = [f"{p.stem}_{args.method}" for p in args.images]
    if len(set(stems)) != len(stems):
        raise ValueError("Expected image files with distinct names, but two share a stem.")
    args.out.mkdir(parents=True, exist_ok=True)
    clashes = [args.out / f"{s}{ext}" for s in stems for ext in (".png", ".npy")]
    clashes = [c for c in clashes if c.exists()]
    if clashes and not args.overwrite:
        raise FileExistsError(f"Output {str(clashes[0])!r} exists; pass --overwrite to replace it.")
    written: list[Path] = []
    for start in tqdm(
        range(0, len(pil), args.batch_size), desc=f"explain ({args.method})", unit="batch"
    ):
        x = torch.stack([transform(im) for im in pil[start : start + args.batch_size]]).to(
            args.device
        )
        maps, logits = explain_with_logits(
            model, x, args.method, target=args.target, foil=args.foil
        )
        probs = logits.float().softmax(dim=1).cpu()
        names = class_names(probs.shape[1])
        pixels = to_pixels(maps, size=x.shape[-2:]).cpu()
        shown = (x.cpu() * std + mean).clamp(0, 1)
        for i, stem in enumerate(stems[start : start + len(x)]):
            raw = maps[i].cpu().numpy()
            npy = args.out / f"{stem}.npy"
            png = args.out / f"{stem}.png"
            atomic_write(npy, lambda tmp, raw=raw: np.save(tmp, raw))
            title = explanation_title(
                f"{stem} ({args.method})", probs[i], names, args.target, args.foil
            )
            save_figure(overlay_figure(shown[i], pixels[i], title=title), png)
            written += [png, npy]
    return written


def _ood_specs(items: Sequence[str]) -> dict[str, str]:
    """``--ood NAME=SPEC ...`` as ``{name: spec}``."""
    specs: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec or name == "data" or name in specs:
            raise ValueError(
                "Expected --ood entries NAME=SPEC with distinct names other than 'data', "
                f"but got {item!r}."
            )
        specs[name] = spec
    return specs


def run_evaluate(args: argparse.Namespace) -> dict:
    """``relreg evaluate``: :func:`relreg.evaluation.run_evaluation` with the parsed arguments;
    returns the report it writes to ``--out/report.json``."""
    from relreg.evaluation import EvaluationSettings, ModelSources, run_evaluation

    settings = EvaluationSettings(
        data=args.data,
        out=args.out,
        ood=_ood_specs(args.ood),
        classes=args.classes,
        scoring=args.scoring,
        preprocessing=args.preprocessing,
        methods=tuple(args.methods),
        unit=args.unit,
        target=args.target,
        steps=args.steps,
        limit=args.limit,
        batch_size=args.batch_size,
        num_heatmaps=args.num_heatmaps,
        device=args.device,
        seed=args.seed,
        overwrite=args.overwrite,
        sanity=args.sanity,
    )
    sources = ModelSources(
        checkpoints=tuple(args.checkpoint),
        pretrained=args.pretrained,
        model=args.model,
        num_classes=args.num_classes,
        model_kwargs=args.model_kwargs,
        labels=None if args.labels is None else tuple(args.labels),
    )
    return run_evaluation(sources, settings)


def _print_report(report: dict) -> None:
    from relreg.evaluation import report_lines

    print("\n".join(report_lines(report)))


def _run_command(args: argparse.Namespace) -> None:
    if args.command == "explain":
        files = run_explain(args)
        print(f"wrote {len(files)} files to {args.out}")
    elif args.command == "evaluate":
        report = run_evaluate(args)
        _print_report(report)
        print(f"wrote {args.out / 'report.json'} and figures")
    elif args.command == "prepare":
        from relreg.data.imagenet_s import prepare_imagenet_s

        reports = prepare_imagenet_s(
            args.masks,
            args.images,
            args.out,
            args.per_class,
            args.train_classes,
            args.class_seed,
            args.copy,
        )
        for part, report in reports.items():
            print(f"{part}: {len(report['pairs'])} images of {report['classes']} classes")
    elif args.command == "masks":
        from relreg.masks import make_masks
        from relreg.masks.make import summary_lines

        summary = make_masks(
            args.images,
            args.out,
            args.method,
            per_class=args.per_class,
            limit=args.limit,
            seed=args.seed,
            prompt=args.prompt,
            batch_size=args.batch_size,
            copy=args.copy,
            overwrite=args.overwrite,
            **_mask_options(args),
        )
        print("\n".join(summary_lines(summary)))
        print(f"wrote {args.out / 'masks'} and {args.out / 'masks_summary.json'}")
    elif args.command == "dfr":
        from relreg.baselines import run_dfr

        report = run_dfr(
            args.checkpoint,
            args.data,
            args.out,
            num_retrains=args.num_retrains,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
        )
        for when in ("before", "after"):
            cells = ", ".join(f"{k} {v:.3f}" for k, v in report[f"test_{when}"].items())
            print(f"test {when} DFR: {cells}")
        print(f"C = {report['c']}; wrote {args.out} and {args.out.with_suffix('.json')}")
    elif args.command == "demo":
        from relreg.demo import run_demo

        arms = {} if args.arms is None else {"arms": tuple(args.arms)}
        run_demo(args.out, tuple(args.seeds), args.configs, args.quick, **arms)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``relreg`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from relreg.lightning.checkpoint_io import CheckpointWriteError
        from relreg.lightning.cli import OutputDirError, run_cli
        from relreg.lightning.nonfinite import NonFiniteError
        from relreg.lightning.resume import CheckpointError

        try:
            with quiet_dependencies():
                run_cli(argv)
        # the faults relreg diagnoses itself: the message says it all, no traceback
        except (OutputDirError, CheckpointError, CheckpointWriteError, NonFiniteError) as err:
            print(f"relreg {argv[0]}: error: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # a full disk while writing a heatmap or report: already explained
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print(f"relreg {argv[0]}: error: {err.strerror}", file=sys.stderr)
            return 2
        return 0
    parser = argparse.ArgumentParser(
        prog="relreg", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _lightning_parsers(sub)
    _explain_parser(sub)
    _evaluate_parser(sub)
    _demo_parser(sub)
    _prepare_parser(sub)
    _masks_parser(sub)
    _dfr_parser(sub)
    args = parser.parse_args(argv)
    try:
        with quiet_dependencies(stages=args.command == "demo"):
            _run_command(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"relreg {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
