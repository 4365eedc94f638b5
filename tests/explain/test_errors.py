"""Bad input gets a clear error naming the argument, the expected and the received value."""

from __future__ import annotations

import pytest
import torch
import torchvision

from relreg.explain import create_explainer, explain, list_explainers
from tests.conftest import images_for, make_tiny_vit, model_state


@pytest.fixture
def model():
    return make_tiny_vit()


def test_wrong_rank(model):
    with pytest.raises(
        ValueError, match=r"images of shape \(B, C, H, W\), but got shape \(3, 16, 16\)"
    ):
        explain(model, torch.randn(3, 16, 16))


def test_wrong_channels(model):
    with pytest.raises(ValueError, match="3 channels for this model, but got 1"):
        explain(model, torch.randn(2, 1, 16, 16))


def test_integer_images(model):
    with pytest.raises(TypeError, match="floating dtype"):
        explain(model, torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_nan_images(model):
    x = images_for(model)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite images"):
        explain(model, x)


@pytest.mark.parametrize("name", list_explainers())
@pytest.mark.parametrize("target", [5, -1, torch.tensor([0, 1, 9])])
def test_target_out_of_range(model, name, target):
    before = model_state(model)
    with pytest.raises(ValueError, match=r"target classes in \[0, 4\]"):
        explain(model, images_for(model), name, target=target)
    assert model_state(model) == before


@pytest.mark.parametrize("target", [1.0, "cat", True])
def test_target_wrong_type(model, target):
    with pytest.raises(TypeError, match="target"):
        explain(model, images_for(model), target=target)


def test_target_wrong_length(model):
    with pytest.raises(ValueError, match=r"of shape \(3,\), but got shape \(2,\)"):
        explain(model, images_for(model), target=torch.tensor([0, 1]))


@pytest.mark.parametrize("name", list_explainers())
def test_foil_equal_to_target(model, name):
    with pytest.raises(
        ValueError, match=r"foil to differ from the target class.*samples \[0, 1, 2\]"
    ):
        explain(model, images_for(model), name, target=2, foil=2)


def test_unsupported_model_for_attention_method():
    cnn = torchvision.models.resnet18(num_classes=3)
    with pytest.raises(ValueError, match="found none in ResNet"):
        explain(cnn, torch.randn(1, 3, 32, 32), "chefer")


def test_gradient_methods_work_on_a_cnn():
    cnn = torchvision.models.resnet18(num_classes=3).eval()
    assert explain(cnn, torch.randn(2, 3, 32, 32), "saliency").shape == (2, 32, 32)


def test_unknown_method_lists_known(model):
    known = r"Unknown explainer 'lrp_magic'; expected one of: (?=.*chefer)(?=.*rollout)"
    with pytest.raises(ValueError, match=known):
        explain(model, images_for(model), "lrp_magic")
    with pytest.raises(ValueError, match="Unknown explainer"):
        create_explainer("nope", model)


def test_unknown_option(model):
    with pytest.raises(
        TypeError, match="'chefer' got unknown options \\['steps'\\]; its options are: start_layer"
    ):
        explain(model, images_for(model), "chefer", steps=3)


@pytest.mark.parametrize("start_layer", [-1, 2, 1.0])
def test_bad_start_layer(model, start_layer):
    with pytest.raises(ValueError, match=r"start_layer an int in \[0, 1\]"):
        explain(model, images_for(model), "chefer", start_layer=start_layer)


def test_inference_mode_is_explained(model):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        explain(model, images_for(model), "chefer")


def test_not_a_model():
    with pytest.raises(TypeError, match="model to be a torch.nn.Module"):
        explain("vit", torch.randn(1, 3, 16, 16))


def test_flag_types(model):
    with pytest.raises(TypeError, match="differentiable to be a bool"):
        explain(model, images_for(model), differentiable="yes")
