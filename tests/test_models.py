"""build_model / load_weights: local checkpoints (weights_only), Lightning prefixes, errors."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch

from relreg.models import build_model, load_weights, timm_state_from_torchvision_vit
from tests.numerics import U64, assert_within, twin_bound

TINY = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2)


def _tiny(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY
    )


def test_checkpoint_round_trip(tmp_path):
    src = _tiny(seed=1)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = build_model("vit_tiny_patch16_224", checkpoint=tmp_path / "w.pt", num_classes=5, **TINY)
    assert not model.training
    for a, b in zip(src.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_lightning_style_checkpoint_with_prefix(tmp_path):
    src = _tiny(seed=2)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "last.ckpt")
    model = load_weights(_tiny(seed=3), tmp_path / "last.ckpt")
    assert torch.equal(model.head.weight, src.head.weight)


def test_wrong_num_classes_is_a_clear_error(tmp_path):
    torch.save(_tiny(num_classes=5).state_dict(), tmp_path / "w.pt")
    with pytest.raises(
        ValueError,
        match=r"(?s)does not fit VisionTransformer "
        r"\(another architecture or another num_classes\?\).*head.weight",
    ):
        build_model("vit_tiny_patch16_224", checkpoint=tmp_path / "w.pt", num_classes=7, **TINY)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("vit_tiny_patch16_224", checkpoint=tmp_path / "nope.pt", **TINY)


def test_checkpoint_never_executes_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(Exception) as info:
        load_weights(_tiny(), tmp_path / "evil.pt")
    assert not isinstance(info.value, SystemExit)


def test_no_loader_executes_code_from_a_checkpoint(tmp_path):
    """relreg evaluate's architecture lookup and relreg fit --ckpt_path (Lightning's loader)."""
    from relreg.lightning.cli import run_cli
    from relreg.models import lightning_model_args

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Evil(), "hyper_parameters": {"model": Evil()}}, f)
    assert lightning_model_args(tmp_path / "evil.ckpt") is None
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer: {accelerator: cpu, max_steps: 1, logger: false, enable_checkpointing: false,"
        " enable_progress_bar: false}\n"
        "model: {model: vit_tiny_patch16_224, num_classes: 4, model_kwargs: "
        "{img_size: 32, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}}\n"
        "data: {batch_size: 4, train: {class_path: relreg.data.SpuriousShapes, "
        "init_args: {split: train, n: 8}}}\n"
    )
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")]
    with pytest.raises(Exception) as info:  # torch's unpickling error type varies by version
        run_cli([*args, "--ckpt_path", str(tmp_path / "evil.ckpt")])
    assert "weights_only" in str(info.value) or "Unpickl" in type(info.value).__name__
    assert not marker.exists()


def test_unknown_model_name_suggests():
    with pytest.raises(
        ValueError,
        match="Expected a timm model name, but got 'vit_tiny_patch16'.*vit_tiny_patch16_224",
    ):
        build_model("vit_tiny_patch16")


def test_pretrained_offline_says_how_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="--checkpoint PATH"):
        build_model("vit_tiny_patch16_224", pretrained=True)


def test_grad_checkpointing_is_switched_on_from_the_model_arguments():
    model = build_model("vit_tiny_patch16_224", grad_checkpointing=True, **TINY)
    assert model.grad_checkpointing
    assert not build_model("vit_tiny_patch16_224", **TINY).grad_checkpointing
    with pytest.raises(TypeError, match="Expected grad_checkpointing to be a bool, but got str"):
        build_model("vit_tiny_patch16_224", grad_checkpointing="yes", **TINY)


def test_a_checkpointed_training_step_equals_the_plain_one():
    """model_kwargs {grad_checkpointing: true} (a fit config's way) trains the same model: the
    step's terms and every gradient, in float64, within the rounding of two summation orders."""
    from relreg.data import SpuriousShapes
    from relreg.lightning import RelRegModule
    from tests.numerics import U64

    ds = SpuriousShapes("train", n=4, size=16)
    keys = ("image", "label", "mask", "has_mask")
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in keys}
    batch["image"] = batch["image"].double()

    def step(checkpointing: bool) -> torch.Tensor:
        torch.manual_seed(0)
        kwargs = {**TINY, "grad_checkpointing": checkpointing}
        module = RelRegModule("vit_tiny_patch16_224", num_classes=4, model_kwargs=kwargs)
        module.model.double().train()
        out = module.model_step(batch, training=True)
        out.loss.backward()
        grads = [p.grad.flatten() for p in module.model.parameters() if p.grad is not None]
        return torch.cat([torch.stack(list(out.terms.values())), *grads])

    plain = step(False)
    checkpointed = step(True)
    # float64 sums of at most a few hundred terms in two orders: far inside 1e3 * U64 relatively
    assert (checkpointed - plain).abs().max() <= 1e3 * U64 * plain.abs().max()
    assert plain.abs().max() > 0


def test_torchvision_vit_weights_give_the_same_function_in_timm():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tv = VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=5).double().eval()
    for p in tv.parameters():  # torchvision zero-initialises the head and biases: jitter them all
        p.data.add_(0.1 * torch.randn_like(p))
    tm = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        mlp_ratio=2.0, num_classes=5, act_layer=torch.nn.GELU,
    ).double().eval()  # fmt: skip
    tm.load_state_dict(timm_state_from_torchvision_vit(tv.state_dict()))  # strict: every key
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want, got = tv(x), tm(x)
        # one function through two kernels (torchvision's MultiheadAttention, timm's fused one):
        # within twice the float64 rounding of the forward pass
        assert_within(got, want, lambda: twin_bound(lambda: tm(x), u=U64), "timm vs torchvision")
    assert want.std() > 0.1  # not a trivially zero output


def test_torchvision_vit_conversion_refuses_other_state_dicts():
    with pytest.raises(ValueError, match="torchvision VisionTransformer state dict"):
        timm_state_from_torchvision_vit({"blocks.0.attn.qkv.weight": torch.zeros(1)})
    state = {"conv_proj.weight": 0, "encoder.ln.weight": 0, "heads.pre_logits.weight": 0}
    with pytest.raises(ValueError, match="pre-logits"):
        timm_state_from_torchvision_vit(state)
