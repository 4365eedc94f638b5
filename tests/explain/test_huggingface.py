"""transformers ViT / DeiT / BEiT through explain(): dense per-image references built from the
model's own output_attentions, gradient maps from autograd, state restored, clear refusals."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from relreg.explain import (  # noqa: E402
    HuggingFaceClassifier,
    HuggingFaceViT,
    as_explainable,
    explain,
    find_attention_modules,
)

TINY = dict(
    image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=3, num_attention_heads=2,
    intermediate_size=48, num_labels=5,
)  # fmt: skip


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY))
    elif kind == "deit":
        model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**TINY))
    else:
        config = transformers.BeitConfig(use_relative_position_bias=True, **TINY)
        model = transformers.BeitForImageClassification(config)
    return model.double().eval()


def _attentions_and_grads(model, image, cls):
    """One image: the model's own attention maps (eager) and their gradients of logit ``cls``."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(pixel_values=image[None], output_attentions=True)
        grads = torch.autograd.grad(out.logits[0, cls], out.attentions)
    finally:
        model.set_attn_implementation(before)
    return [a[0].detach() for a in out.attentions], [g[0] for g in grads]


def _readout(kind: str, n: int, prefix: int) -> torch.Tensor:
    w = torch.zeros(n, dtype=torch.float64)
    if kind == "beit":  # mean pooling over the patch tokens
        w[prefix:] = 1 / (n - prefix)
    else:
        w[0] = 1
    return w


def _dense(kind, model, images, classes, method):
    prefix = 2 if kind == "deit" else 1
    rows = []
    for image, cls in zip(images, classes.tolist(), strict=True):
        attns, grads = _attentions_and_grads(model, image, cls)
        n = attns[0].shape[-1]
        eye = torch.eye(n, dtype=torch.float64)
        if method == "chefer":
            r = eye
            for a, g in zip(attns, grads, strict=True):
                r = r + (g * a).clamp(min=0).mean(0) @ r
        elif method == "rollout":
            r = None
            for a in attns:
                m = a.mean(0) + eye
                m = m / m.sum(-1, keepdim=True)
                r = m if r is None else m @ r
        else:  # raw_attention: last block, head mean
            r = attns[-1].mean(0)
        rows.append((_readout(kind, n, prefix) @ r)[prefix:])
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["vit", "deit", "beit"])
@pytest.mark.parametrize("method", ["chefer", "rollout", "raw_attention"])
def test_attention_maps_equal_a_dense_per_image_reference(kind, method):
    model = _model(kind)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 3, 1])
    maps = explain(model, x, method, target=target)
    assert maps.shape == (3, 4, 4)
    torch.testing.assert_close(maps.flatten(1), _dense(kind, model, x, target, method))
    assert model.config._attn_implementation == "sdpa"  # restored


def test_layout_of_the_wrapped_models():
    vit, deit, beit = (as_explainable(_model(k)) for k in ("vit", "deit", "beit"))
    assert [m.num_prefix_tokens for m in (vit, deit, beit)] == [1, 2, 1]
    assert [m.global_pool for m in (vit, deit, beit)] == ["token", "token", "avg"]
    assert len(find_attention_modules(vit)) == TINY["num_hidden_layers"]
    assert as_explainable(vit) is vit  # already wrapped
    timm_like = torch.nn.Linear(2, 2)
    assert as_explainable(timm_like) is timm_like


def test_other_image_sizes_interpolate_the_position_table():
    model = _model("vit")
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    assert explain(model, x, "chefer").shape == (2, 6, 5)


def test_saliency_equals_the_autograd_input_gradient():
    model = _model("beit")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([4, 2])
    maps = explain(model, x, "saliency", target=target)
    xr = x.clone().requires_grad_(True)
    logits = model(pixel_values=xr).logits
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xr)
    torch.testing.assert_close(maps, grad.abs().amax(1))


def test_batched_chefer_equals_a_per_image_loop():
    model = _model("deit")
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    batched = explain(model, x, "chefer", target=2)
    looped = torch.cat([explain(model, x[i : i + 1], "chefer", target=2) for i in range(3)])
    torch.testing.assert_close(batched, looped)


def test_differentiable_chefer_reaches_the_hf_parameters():
    model = _model("vit").train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    maps = explain(model, x, "chefer", target=1, differentiable=True)
    maps.sum().backward()
    grad = model.vit.embeddings.patch_embeddings.projection.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.training and model.config._attn_implementation == "sdpa"


def test_attention_implementation_restored_after_an_error():
    model = _model("vit")
    with pytest.raises(ValueError, match="target"):
        explain(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), "chefer", target=99)
    assert model.config._attn_implementation == "sdpa"


def test_swin_gets_gradient_explainers_and_a_clear_refusal():
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
        num_labels=3,
    )  # fmt: skip
    model = transformers.SwinForImageClassification(config).eval()
    assert isinstance(as_explainable(model), HuggingFaceClassifier)
    assert not isinstance(as_explainable(model), HuggingFaceViT)
    x = torch.randn(2, 3, 32, 32)
    assert explain(model, x, "saliency").shape == (2, 32, 32)
    with pytest.raises(ValueError, match=r"model_type 'swin'.*saliency, input_x_gradient"):
        explain(model, x, "chefer")
    with pytest.raises(TypeError, match="transformers PreTrainedModel"):
        HuggingFaceClassifier(torch.nn.Linear(2, 2))


def test_a_size_that_is_not_a_multiple_of_the_patch_is_floored_as_the_convolution_does():
    model = _model("vit")
    x = torch.randn(2, 3, 36, 44, dtype=torch.float64)  # 4 x 5 patches of 8, remainder dropped
    assert explain(model, x, "chefer").shape == (2, 4, 5)
    assert explain(model, x, "rollout").shape == (2, 4, 5)


@pytest.mark.parametrize("kind", ["vit", "deit", "beit"])
def test_transformers_models_run_on_the_chunked_engine_with_the_dense_maps(kind):
    from relreg.explain.capture import KernelCapture
    from tests.numerics import rounding_bound

    model = as_explainable(_model(kind))
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with KernelCapture(model) as cap:
        model(images)
    assert [c.block for c in cap.calls] == list(range(TINY["num_hidden_layers"]))
    dense = explain(model, images, "chefer", engine="dense")
    chunked = explain(model, images, "chefer", engine="chunked", chunk_size=5)
    # the dense engine reads transformers' eager attention, whose softmax runs in float32; the
    # chunked engine recomputes it in float64: they differ by float32 rounding
    bound = rounding_bound(lambda: explain(model, images, "chefer", engine="dense"))
    assert ((chunked - dense).abs() <= bound).all()
    assert dense.abs().max() > 0
