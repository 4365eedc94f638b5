"""The ``relreg`` command.

- ``relreg fit|validate|test|predict --config FILE.yaml``: the fine-tuning job (LightningCLI);
- ``relreg explain IMAGE ... --model NAME``: heatmaps of image files;
- ``relreg demo``: the whole job on the built-in CPU benchmark.

Run ``relreg COMMAND --help`` for the options of each command.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

__all__ = ["main"]


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


def _load_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"Expected an image file, but {str(path)!r} does not exist.")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Could not read {str(path)!r} as an image: {err}") from err


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_explain(args: argparse.Namespace) -> list[Path]:
    """``relreg explain``: returns the files written."""
    import timm.data

    from relreg.explain import explain, to_pixels
    from relreg.models import build_model
    from relreg.viz import overlay_figure, save_figure

    if args.batch_size < 1:
        raise ValueError(f"Expected --batch-size >= 1, but got {args.batch_size}.")
    kwargs = {
        k: v
        for k, v in (("img_size", args.img_size), ("patch_size", args.patch_size))
        if v is not None
    }
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
        maps = explain(model, x, args.method, target=args.target, foil=args.foil)
        pixels = to_pixels(maps, size=x.shape[-2:]).cpu()
        shown = (x.cpu() * std + mean).clamp(0, 1)
        for i, stem in enumerate(stems[start : start + len(x)]):
            raw = maps[i].cpu().numpy()
            npy, png = args.out / f"{stem}.npy", args.out / f"{stem}.png"
            _atomic_write(npy, lambda tmp, raw=raw: np.save(tmp, raw))
            save_figure(overlay_figure(shown[i], pixels[i], title=f"{stem} ({args.method})"), png)
            written += [png, npy]
    return written


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``relreg`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from relreg.lightning.cli import run_cli

        run_cli(argv)
        return 0
    parser = argparse.ArgumentParser(
        prog="relreg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _explain_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "explain":
            files = run_explain(args)
            print(f"wrote {len(files)} files to {args.out}")
        elif args.command == "demo":
            from relreg.demo import run_demo

            run_demo(args.out, seeds=tuple(args.seeds), configs=args.configs, quick=args.quick)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"relreg {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
