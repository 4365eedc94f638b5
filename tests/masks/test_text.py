"""The text-prompted segmenters' plumbing on tiny random-config transformers models built offline
(a character vocabulary for the CLIP tokenizer): shapes at each image's size, thresholds,
batching, errors, and ``make_masks`` through the registry. The real weights load by name."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from relreg.masks import CLIPSegMasks, SAM3Masks, make_masks  # noqa: E402
from tests.masks.test_make import image_tree  # noqa: E402


def tiny_tokenizer():
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[]), len(vocab)


def text_config(vocab_size: int, hidden: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


@pytest.fixture(scope="module")
def clipseg():
    torch.manual_seed(0)
    tokenizer, n = tiny_tokenizer()
    config = transformers.CLIPSegConfig(
        text_config=text_config(n, 16),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
        extract_layers=[0, 1],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    model = transformers.CLIPSegForImageSegmentation(config).eval()
    images = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    return model, transformers.CLIPSegProcessor(image_processor=images, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def sam3():
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

    torch.manual_seed(0)
    tokenizer, n = tiny_tokenizer()
    h = 32
    small = dict(hidden_size=h, num_layers=1, num_attention_heads=2, intermediate_size=2 * h)
    config = transformers.Sam3Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam3_vit_model",
                hidden_size=h,
                intermediate_size=2 * h,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=56,
                patch_size=14,
                window_size=2,
                global_attn_indexes=[1],
                pretrain_image_size=56,
            ),
            fpn_hidden_size=h,
            backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        ),
        text_config=transformers.CLIPTextConfig(**text_config(n, h), projection_dim=h),
        geometry_encoder_config=small,
        detr_encoder_config=small,
        detr_decoder_config={**small, "num_queries": 5},
        mask_decoder_config=dict(hidden_size=h, num_attention_heads=2),
    )
    model = transformers.Sam3Model(config).eval()
    images = Sam3ImageProcessor(size={"height": 56, "width": 56})
    return model, transformers.Sam3Processor(image_processor=images, tokenizer=tokenizer)


def images_of(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, *s), generator=g, dtype=torch.uint8) for s in sizes]


SIZES = [(40, 30), (24, 36), (32, 32)]
PROMPTS = ["a photo of a cat", "a dog", "a photo of a goldfish"]


def test_clipseg_masks_are_thresholded_probabilities_at_each_images_size(clipseg):
    segment = CLIPSegMasks(clipseg, threshold=0.5)
    images = images_of(SIZES)
    probs = segment.probabilities(images, PROMPTS)
    masks = segment(images, PROMPTS)
    assert [tuple(m.shape) for m in masks] == SIZES and all(m.dtype == torch.bool for m in masks)
    for p, m in zip(probs, masks, strict=True):
        assert torch.equal(m, p > 0.5) and 0 <= p.min() and p.max() <= 1
    assert all(m.all() for m in CLIPSegMasks(clipseg, threshold=0.0)(images, PROMPTS))
    assert not any(m.any() for m in CLIPSegMasks(clipseg, threshold=1.0)(images, PROMPTS))


def test_clipseg_batched_equals_one_image_at_a_time(clipseg):
    segment = CLIPSegMasks(clipseg)
    images = images_of(SIZES, seed=1)
    batched = segment.probabilities(images, PROMPTS)
    # B = 1 keeps its batch dimension
    for image, prompt, p in zip(images, PROMPTS, batched, strict=True):
        torch.testing.assert_close(segment.probabilities([image], [prompt])[0], p)


def test_sam3_mask_is_the_union_of_the_kept_instances(sam3):
    model, processor = sam3
    images = images_of(SIZES[:2], seed=2)
    masks = SAM3Masks(sam3, threshold=0.0, mask_threshold=0.5)(images, PROMPTS[:2])
    assert [tuple(m.shape) for m in masks] == SIZES[:2]
    from PIL import Image

    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    with torch.no_grad():
        out = model(**processor(images=pil, text=PROMPTS[:2], return_tensors="pt"))
    results = processor.post_process_instance_segmentation(
        out, threshold=0.0, mask_threshold=0.5, target_sizes=SIZES[:2]
    )
    for mask, result in zip(masks, results, strict=True):
        assert len(result["masks"]) == 5
        assert torch.equal(mask, result["masks"].bool().any(0))
    none = SAM3Masks(sam3, threshold=1.0)(images, PROMPTS[:2])
    assert not any(m.any() for m in none)


@pytest.mark.parametrize("cls", [CLIPSegMasks, SAM3Masks])
def test_bad_input_is_named(cls, clipseg, sam3):
    pair = clipseg if cls is CLIPSegMasks else sam3
    with pytest.raises(ValueError, match="Expected threshold to be a probability"):
        cls(pair, threshold=1.5)
    with pytest.raises(TypeError, match="Hugging Face name or a \\(model, processor\\) pair"):
        cls(3)
    with pytest.raises(ValueError, match="one prompt per image \\(2\\), but got 1"):
        cls(pair)(images_of(SIZES[:2]), ["a cat"])


def test_make_masks_runs_a_text_method_by_name(tmp_path, clipseg):
    images = image_tree(tmp_path / "raw", per_class=2)
    summary = make_masks(
        images, tmp_path / "made", "clipseg", progress=False, model=clipseg, threshold=0.0
    )
    assert summary["masks_written"] == 4 and summary["whole_image"] == 4
    assert summary["method"] == "clipseg" and summary["options"] == {
        "model": "tuple",
        "threshold": 0.0,
    }


@pytest.mark.parametrize("kind", ["clipseg", "sam3"])
def test_a_saved_model_loads_by_name_through_from_pretrained(tmp_path, kind, clipseg, sam3):
    """The loading path a user takes (a Hub name or a local folder), on a saved tiny model."""
    cls, (model, processor) = (CLIPSegMasks, clipseg) if kind == "clipseg" else (SAM3Masks, sam3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = cls(str(tmp_path), threshold=0.5)
    images = images_of(SIZES[:2], seed=4)
    expected = cls((model, processor), threshold=0.5)(images, PROMPTS[:2])
    for a, b in zip(loaded(images, PROMPTS[:2]), expected, strict=True):
        assert torch.equal(a, b)
