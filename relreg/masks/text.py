"""Text-prompted foreground masks with Hugging Face transformers' open segmenters.

- **CLIPSeg** (Lüddecke & Ecker, *Image Segmentation Using Text and Image Prompts*, CVPR 2022):
  one forward pass gives a per-pixel logit for the prompt; the mask is ``sigmoid > threshold``
  at the image's size. Default weights ``"CIDAS/clipseg-rd64-refined"``.
- **SAM 3** (Meta, *SAM 3: Segment Anything with Concepts*, 2025): detects and segments every
  instance of a text concept; the mask is the union of the instances scoring above
  ``threshold``. Default weights ``"facebook/sam3"``. relreg offers SAM 3 rather than CFT's
  GroundingDINO + SAM pipeline (``scripts/generate_concept_segments.py`` of yonisGit/cft): it
  takes the text prompt itself, so one model replaces a detector and a box-prompted segmenter,
  and its masks are the SAM family's.

Both load with ``from_pretrained(name)`` exactly as a user with network access (or a Hugging
Face cache) loads them; an already-built ``(model, processor)`` pair can be passed instead
(the tests build tiny random ones offline). Needs the ``hf`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLIPSegMasks", "SAM3Masks"]


def _check_threshold(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Expected {name} to be a probability in [0, 1], but got {value!r}.")
    return float(value)


def _check_prompts(images: Sequence[Tensor], prompts: Sequence[str]) -> None:
    if len(prompts) != len(images):
        raise ValueError(
            f"Expected one prompt per image ({len(images)}), but got {len(prompts)} prompts."
        )


def _pil(image: Tensor):  # noqa: ANN202
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


class _HFSegmenter:
    """Shared loading of a (model, processor) pair, by name or given built."""

    model_class = ""
    processor_class = ""
    default = ""

    def __init__(
        self,
        model: str | tuple[nn.Module, object] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        import transformers

        model = self.default if model is None else model
        if isinstance(model, str):
            self.model = getattr(transformers, self.model_class).from_pretrained(model)
            self.processor = getattr(transformers, self.processor_class).from_pretrained(model)
        elif isinstance(model, tuple) and len(model) == 2:
            self.model, self.processor = model
        else:
            raise TypeError(
                f"Expected model to be a Hugging Face name or a (model, processor) pair, but got "
                f"{type(model).__name__}."
            )
        self.model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device


class CLIPSegMasks(_HFSegmenter):
    """CLIPSeg masks: ``sigmoid(logits) > threshold``, resized to each image (bilinear).

    Args:
        model: a Hugging Face name (default ``"CIDAS/clipseg-rd64-refined"``) or a
            ``(CLIPSegForImageSegmentation, CLIPSegProcessor)`` pair.
        threshold: probability above which a pixel is foreground.
        device: where the model runs.

    Call it with ``B`` uint8 images ``(3, H_i, W_i)`` and ``B`` prompts; it returns ``B`` bool
    masks ``(H_i, W_i)``.
    """

    model_class = "CLIPSegForImageSegmentation"
    processor_class = "CLIPSegProcessor"
    default = "CIDAS/clipseg-rd64-refined"

    def __init__(
        self,
        model: str | tuple[nn.Module, object] | None = None,
        threshold: float = 0.5,
        device: str | torch.device | None = None,
    ) -> None:
        self.threshold = _check_threshold("threshold", threshold)
        super().__init__(model, device)

    @torch.no_grad()
    def probabilities(self, images: Sequence[Tensor], prompts: Sequence[str]) -> list[Tensor]:
        """Per-pixel foreground probabilities, ``(H_i, W_i)`` float each."""
        _check_prompts(images, prompts)
        inputs = self.processor(
            text=list(prompts),
            images=[_pil(im) for im in images],
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        logits = self.model(**inputs).logits
        logits = logits.view(len(images), *logits.shape[-2:])  # (B, h, w), also for B = 1
        return [
            F.interpolate(p[None, None].float(), im.shape[-2:], mode="bilinear")[0, 0].cpu()
            for p, im in zip(logits.sigmoid(), images, strict=True)
        ]

    def __call__(self, images: Sequence[Tensor], prompts: Sequence[str]) -> list[Tensor]:
        return [p > self.threshold for p in self.probabilities(images, prompts)]


class SAM3Masks(_HFSegmenter):
    """SAM 3 masks: the union of the prompted concept's instances scoring above ``threshold``.

    Args:
        model: a Hugging Face name (default ``"facebook/sam3"``) or a
            ``(Sam3Model, Sam3Processor)`` pair.
        threshold: score above which an instance is kept (transformers' default 0.3).
        mask_threshold: probability above which a pixel belongs to an instance (0.5).
        device: where the model runs.

    Call it with ``B`` uint8 images ``(3, H_i, W_i)`` and ``B`` prompts; it returns ``B`` bool
    masks ``(H_i, W_i)`` (empty when no instance scores above ``threshold``).
    """

    model_class = "Sam3Model"
    processor_class = "Sam3Processor"
    default = "facebook/sam3"

    def __init__(
        self,
        model: str | tuple[nn.Module, object] | None = None,
        threshold: float = 0.3,
        mask_threshold: float = 0.5,
        device: str | torch.device | None = None,
    ) -> None:
        self.threshold = _check_threshold("threshold", threshold)
        self.mask_threshold = _check_threshold("mask_threshold", mask_threshold)
        super().__init__(model, device)

    @torch.no_grad()
    def __call__(self, images: Sequence[Tensor], prompts: Sequence[str]) -> list[Tensor]:
        _check_prompts(images, prompts)
        inputs = self.processor(
            images=[_pil(im) for im in images], text=list(prompts), return_tensors="pt"
        ).to(self.device)
        outputs = self.model(**inputs)
        results = self.processor.post_process_instance_segmentation(
            outputs,
            threshold=self.threshold,
            mask_threshold=self.mask_threshold,
            target_sizes=[tuple(im.shape[-2:]) for im in images],
        )
        masks = []
        for image, result in zip(images, results, strict=True):
            instances = result["masks"].bool().cpu()
            empty = torch.zeros(image.shape[-2:], dtype=torch.bool)
            masks.append(instances.any(0) if len(instances) else empty)
        return masks
