"""Cost per image of ``relreg masks``' methods at their real sizes (random weights: the cost is the
architecture's, not the weights').

    python experiments/bench_masks.py --out experiments/results/bench_masks.json

- ``tokencut``: timm's ``vit_small_patch16_224`` (the DINO ViT-S/16 architecture), 224 px, with
  and without the bilateral refinement at 320 x 240 (the images' own size);
- ``clipseg``: transformers' default ``CLIPSegConfig`` (the ``CIDAS/clipseg-rd64-refined``
  architecture: CLIP ViT-B/16, 352 px);
- ``sam3``: transformers' default ``Sam3Config`` (the ``facebook/sam3`` architecture, 1008 px),
  only with ``--sam3`` (about 850 M parameters: minutes per image on a 2-core CPU).

Median seconds per image over ``--repeats`` batches after a warm-up; writes the JSON and a bar
figure next to it, with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from machine_info import machine  # noqa: E402

from relreg.io import atomic_write  # noqa: E402
from relreg.masks import CLIPSegMasks, SAM3Masks, TokenCut  # noqa: E402


def timed(segment, images, prompts, repeats: int) -> dict:
    segment(images[:1], prompts[:1])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        segment(images, prompts)
        times.append((time.perf_counter() - start) / len(images))
    return {"median_s_per_image": round(statistics.median(times), 4), "all": times}


def _tokenizer():
    """A character vocabulary for CLIP's tokenizer (the prompt's length is what costs)."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[])


def _hf_pair(kind: str):
    import transformers

    if kind == "clipseg":
        model = transformers.CLIPSegForImageSegmentation(transformers.CLIPSegConfig()).eval()
        processor = transformers.CLIPSegProcessor(
            image_processor=transformers.ViTImageProcessor(
                size={"height": 352, "width": 352}, do_normalize=True
            ),
            tokenizer=_tokenizer(),
        )
        return model, processor
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

    model = transformers.Sam3Model(transformers.Sam3Config()).eval()
    processor = transformers.Sam3Processor(
        image_processor=Sam3ImageProcessor(), tokenizer=_tokenizer()
    )
    return model, processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_masks.json"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sam3", action="store_true", help="also SAM 3 (slow on a CPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 240, 320), generator=g, dtype=torch.uint8)] * args.batch
    prompts = ["a photo of a goldfish"] * args.batch
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    cases = {
        "tokencut (ViT-S/16, 224 px)": TokenCut(vit),
        "tokencut + bilateral solver (320 x 240)": TokenCut(vit, refine=True),
        "clipseg (CLIP ViT-B/16, 352 px)": CLIPSegMasks(_hf_pair("clipseg")),
    }
    if args.sam3:
        cases["sam3 (1008 px)"] = SAM3Masks(_hf_pair("sam3"))
    results = {}
    for name, segment in cases.items():
        results[name] = timed(segment, images, prompts, args.repeats)
        print(f"{name:45s} {results[name]['median_s_per_image']:.4f} s / image")
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(results)))
    ax.barh(list(results), [r["median_s_per_image"] for r in results.values()])
    ax.set_xlabel("seconds per image (median, CPU)")
    ax.invert_yaxis()
    fig.tight_layout()
    atomic_write(args.out.with_suffix(".png"), lambda t: fig.savefig(t, dpi=110, format="png"))
    report = {"machine": machine("cpu"), "batch": args.batch, "repeats": args.repeats, **results}
    atomic_write(args.out, lambda t: Path(t).write_text(json.dumps(report, indent=2)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
