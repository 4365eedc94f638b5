"""attnlrp: equal to LXT 2.1 on shared weights, to a hand-written reference of its rules on timm,
on every family; batched, trainable (gradcheck), scoped to the model's own modules, undone."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from relreg.explain import AttnLRPRules, explain, explain_with_logits, sum_to_patches
from relreg.models import timm_state_from_torchvision_vit
from tests.explain.families import FAMILIES, build_family
from tests.numerics import U64, assert_within, twin_bound

RUNNER = Path(__file__).with_name("lxt_runner.py")
TV_CONFIG = {
    "image_size": 32,
    "patch_size": 8,
    "num_layers": 2,
    "num_heads": 2,
    "hidden_dim": 32,
    "mlp_dim": 64,
    "num_classes": 10,
}


def _x(batch: int = 3, size: int = 32, dtype: torch.dtype = torch.float64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, dtype=dtype, generator=gen)


def _tiny_vit(dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    config = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    config.update(kwargs)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, **config).to(dtype).eval()
    _jitter(model)
    return model


def _jitter(model: nn.Module, seed: int = 3) -> None:
    """Random values in every parameter (norm weights near 1), so no rule meets a zero or a one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name or ".ln" in name:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.3 * noise if p.ndim > 1 else 0.1 * noise)


# ------------------------------------------------------------------ LXT on shared weights


def _shared_weight_pair():
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

    torch.manual_seed(0)
    tv = TorchvisionViT(**TV_CONFIG).double().eval()
    _jitter(tv)
    tm = (
        timm.create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            num_classes=10,
            act_layer=nn.GELU,
        )
        .double()
        .eval()
    )
    tm.load_state_dict(timm_state_from_torchvision_vit(tv.state_dict()))
    return tv, tm


@pytest.mark.skipif(importlib.util.find_spec("lxt") is None, reason="needs lxt 2.1 (make venv)")
def test_cp_lrp_equals_lxt_on_shared_weights(tmp_path):
    tv, tm = _shared_weight_pair()
    x = _x(4)
    with torch.no_grad():  # the weight mapping is right: the two models agree
        assert torch.allclose(tv(x), tm(x), rtol=0, atol=1e-10)
    target = torch.tensor([0, 3, 7, 9])
    torch.save(
        {"config": TV_CONFIG, "state_dict": tv.state_dict(), "images": x, "target": target},
        tmp_path / "in.pt",
    )
    subprocess.run(
        [sys.executable, str(RUNNER), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    theirs = torch.load(tmp_path / "out.pt")
    ours = explain(tm, x, "attnlrp", target=target)
    error = ((ours - theirs["maps"]).norm() / theirs["maps"].norm()).item()
    assert error <= 1e-5, error
    # and a different rule would not pass: AttnLRP inside attention differs from CP-LRP
    other = explain(tm, x, "attnlrp", target=target, attention="attnlrp")
    assert ((other - theirs["maps"]).norm() / theirs["maps"].norm()).item() > 1e-3


# ---------------------------------------------------- a hand-written reference of the rules


class _IdentityRule(torch.autograd.Function):
    """LXT's ``identity_rule_implicit_fn``: forward ``f(x)``, backward ``f(x)/(x + 1e-10) * g``."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        y = F.gelu(x)
        ctx.save_for_backward(y / (x + 1e-10))
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return ctx.saved_tensors[0] * g


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    t = t.clone()
    t.register_hook(lambda g: g / factor)
    return t


def _reference(model: nn.Module, x: torch.Tensor, target: torch.Tensor, attention: str):
    """The rules written out for timm's ``VisionTransformer`` (token pool, GELU MLP)."""

    def ln(m: nn.LayerNorm, h: torch.Tensor) -> torch.Tensor:
        c = h - h.mean(-1, keepdim=True)
        return c / (c.pow(2).mean(-1, keepdim=True) + m.eps).sqrt().detach() * m.weight + m.bias

    x = x.clone().requires_grad_(True)
    h = model._pos_embed(model.patch_embed(x))
    for block in model.blocks:
        a = block.attn
        b, n, d = h.shape
        qkv = F.linear(ln(block.norm1, h), a.qkv.weight, a.qkv.bias)
        q, k, v = qkv.reshape(b, n, 3, a.num_heads, d // a.num_heads).permute(2, 0, 3, 1, 4)
        if attention == "cp":
            q, k = q.detach(), k.detach()
        else:
            q, k, v = _scaled(q, 4), _scaled(k, 4), _scaled(v, 2)
        probs = (q @ k.transpose(-2, -1) * a.scale).softmax(-1)
        o = (probs @ v).transpose(1, 2).reshape(b, n, d)
        h = h + F.linear(o, a.proj.weight, a.proj.bias)
        m = block.mlp
        hidden = _IdentityRule.apply(F.linear(ln(block.norm2, h), m.fc1.weight, m.fc1.bias))
        h = h + F.linear(hidden, m.fc2.weight, m.fc2.bias)
    logits = model.head(ln(model.norm, h)[:, 0])
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return (x * grad).sum(1)


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_attnlrp_equals_the_rules_written_out(attention):
    model = _tiny_vit(act_layer=nn.GELU)
    x, target = _x(3), torch.tensor([0, 2, 4])
    ours = explain(model, x, "attnlrp", target=target, attention=attention)
    expected = _reference(model, x, target, attention)
    bound = twin_bound(lambda: _reference(model, x, target, attention), u=U64)
    assert ((ours - expected).abs() <= bound).all()
    assert expected.abs().max() > 0


def test_cp_lrp_conserves_the_logit_without_biases(monkeypatch):
    """With every bias, the position embedding and the class token zero, the CP-LRP network is
    linear in the pixels under its rules: the map sums to the explained logit, with the Gamma
    rule too. The only departures are the rules' epsilons (the identity rule's 1e-10, zennit's
    stabiliser 1e-6), set to zero here: what is left is float64 rounding."""
    import relreg.explain.attnlrp_rules as rules

    model = _tiny_vit(class_token=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("pos_embed", "cls_token"):
                p.zero_()
    x, target = _x(2), torch.tensor([1, 3])
    logit = model(x).gather(1, target[:, None])[:, 0].detach()
    monkeypatch.setattr(rules, "_IDENTITY_EPS", 0.0)
    monkeypatch.setattr(rules, "_GAMMA_STABILIZER", 1e-300)
    for gamma in (None, 0.25):

        def total(gamma=gamma):  # noqa: ANN202
            return explain(model, x, "attnlrp", target=target, gamma=gamma).sum((1, 2))

        assert_within(total(), logit, lambda: twin_bound(total, u=U64), f"gamma={gamma}")
    # AttnLRP's softmax rule does not conserve: the check above could fail
    other = explain(model, x, "attnlrp", target=target, attention="attnlrp").sum((1, 2))
    assert not torch.allclose(other, logit, rtol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("zennit") is None, reason="needs zennit (make venv)")
def test_gamma_rule_equals_zennit(monkeypatch):
    """relreg's Gamma rule against zennit's ``Gamma`` on an MLP; relreg's ReLU takes the identity
    rule, whose 1e-10 is set to zero here, so that it is zennit's plain gradient exactly."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import Gamma

    import relreg.explain.attnlrp_rules as rules

    monkeypatch.setattr(rules, "_IDENTITY_EPS", 0.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 4])

    def ours():  # noqa: ANN202
        with AttnLRPRules(model, gamma=0.25):
            out = model(x)
            (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
        return x * grad

    def theirs():  # noqa: ANN202
        with LayerMapComposite([(nn.Linear, Gamma(0.25))]).context(model) as modified:
            out = modified(x)
            start = F.one_hot(target, 5).double() * out
            return torch.autograd.grad(out, x, grad_outputs=start)[0]

    assert_within(ours(), theirs(), lambda: twin_bound(theirs, u=U64))
    plain = x * torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)[0]
    assert not torch.allclose(ours(), plain, rtol=1e-3)


# --------------------------------------------------------------------------- every family


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_attnlrp_on_every_family_batched_and_dense_equal_fused(family, attention):
    model = build_family(family, dtype=torch.float64)
    x = _x(2)
    with AttnLRPRules(model, attention) as rules:
        model(x)
    assert rules.calls >= 1
    fused = explain(model, x, "attnlrp", attention=attention, gamma=0.25)
    assert fused.shape == (2, 32, 32) and torch.isfinite(fused).all() and fused.abs().max() > 0
    dense = explain(model, x, "attnlrp", attention=attention, gamma=0.25, differentiable=True)
    one = torch.cat([explain(model, x[i : i + 1], "attnlrp", attention=attention, gamma=0.25)
                     for i in range(2)])  # fmt: skip
    bound = twin_bound(lambda: explain(model, x, "attnlrp", attention=attention, gamma=0.25), u=U64)
    assert ((dense.detach() - fused).abs() <= bound).all()
    assert ((one - fused).abs() <= bound).all()


# ------------------------------------------------------------------------------ trainable


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_gradcheck_of_the_map(attention):
    """The map's derivative is the derivative of the rules' graph: exact where no rule holds a
    value-dependent factor constant (ReLU, no norms), so gradcheck can compare it with finite
    differences, in the pixels and in the attention weights."""
    x = _x(1, 16).requires_grad_(True)
    model = _tiny_vit(act_layer=nn.ReLU, norm_layer=nn.Identity, depth=1, embed_dim=8, img_size=16)
    target = torch.tensor([1])

    def of_pixels(images):
        return explain(model, images, "attnlrp", target=target, attention=attention,
                       differentiable=True)  # fmt: skip

    assert torch.autograd.gradcheck(of_pixels, (x,), fast_mode=True)
    qkv = model.blocks[0].attn.qkv.weight

    def of_qkv(weight):
        with torch.nn.utils.stateless._reparametrize_module(
            model, {"blocks.0.attn.qkv.weight": weight}
        ):
            return of_pixels(x.detach())

    assert torch.autograd.gradcheck(of_qkv, (qkv.detach().clone().requires_grad_(True),),
                                    fast_mode=True)  # fmt: skip


def test_differentiable_maps_train_the_attention_and_logits_are_the_models():
    model = _tiny_vit(dtype=torch.float32)
    x = _x(2, dtype=torch.float32)
    maps, logits = explain_with_logits(model, x, "attnlrp", target=[0, 1], differentiable=True)
    maps.square().sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad[:32].abs().sum() > 0  # W_q, through A
    model.zero_grad()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    for a, b in zip(ours, (p.grad for p in model.parameters()), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ scope, undo, errors


def test_rules_are_scoped_to_the_model_and_undone_after_an_error():
    model, other = _tiny_vit(), _tiny_vit()
    classes = {c: c.forward for c in (nn.LayerNorm, nn.GELU, nn.Linear, timm.layers.LayerNorm)}
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    x = _x(2)
    plain = torch.autograd.grad(other(x.requires_grad_(True))[:, 0].sum(), x)[0]
    with AttnLRPRules(model, gamma=0.25):
        assert "forward" in vars(model.blocks[0].norm1)
        inside = torch.autograd.grad(other(x)[:, 0].sum(), x)[0]
    assert torch.equal(inside, plain)  # another model in the process is untouched
    with pytest.raises(ZeroDivisionError), AttnLRPRules(model, "attnlrp", 0.25, dense=True):
        model(x)
        raise ZeroDivisionError
    assert not any("forward" in vars(m) for m in model.modules())
    assert {c: c.forward for c in classes} == classes
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == flags


def test_bad_arguments_are_refused_before_any_work():
    model = _tiny_vit()
    with pytest.raises(ValueError, match=r"attention one of \('cp', 'attnlrp'\), but got 'soft'"):
        explain(model, _x(1), "attnlrp", attention="soft")
    with pytest.raises(ValueError, match="gamma None or a float >= 0, but got -1"):
        explain(model, _x(1), "attnlrp", gamma=-1)
    with pytest.raises(TypeError, match="model to be a torch.nn.Module"):
        AttnLRPRules("vit")


def test_a_model_whose_attention_skips_the_kernel_is_refused():
    class NoKernel(nn.Module):
        def forward(self, x, **kwargs):  # noqa: ANN001, ANN003, ANN202
            return x

    model = _tiny_vit()
    for block in model.blocks:
        block.attn = NoKernel()  # blocks that call no attention kernel
    with pytest.raises(ValueError, match="no such call"):
        explain(model, _x(1), "attnlrp")


def test_sum_to_patches_keeps_the_total_and_checks_shapes():
    maps = torch.randn(2, 32, 32)
    patches = sum_to_patches(maps, 8)
    assert patches.shape == (2, 4, 4)
    assert torch.allclose(patches.sum((1, 2)), maps.sum((1, 2)))
    assert torch.allclose(patches[0, 1, 2], maps[0, 8:16, 16:24].sum())
    with pytest.raises(ValueError, match="divisible by 5"):
        sum_to_patches(maps, 5)
