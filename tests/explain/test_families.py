"""Every timm ViT family: the family table in docs/guide/explainers.md is what the code does, the
chunked engine equals the dense engine on every family in its scope (maps and parameter
gradients), attention pooling (SigLIP) is explained and trainable, Swin is refused clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from relreg.explain import explain, explainer_info, select_engine
from relreg.explain.capture import AttentionCapture
from tests.explain.families import FAMILIES, build_family
from tests.numerics import U64, twin_bound

DOCS = Path(__file__).resolve().parents[2] / "docs" / "guide" / "explainers.md"
# the attention explainers one by one; saliency stands for the gradient and perturbation
# explainers, which need only a differentiable classifier
COLUMNS = [
    "chefer",
    "rollout",
    "raw_attention",
    "gradcam",
    "transformer_attribution",
    "partial_lrp",
    "lrp",
    "saliency",
]
CHUNKED_SCOPE = [f for f in FAMILIES if f != "Swin"]


def _trainable(model: torch.nn.Module, x: torch.Tensor, name: str) -> bool:
    model.zero_grad(set_to_none=True)
    explain(model, x, name, differentiable=True).square().sum().backward()
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def _cell(model: torch.nn.Module, x: torch.Tensor, name: str) -> str:
    """What ``name`` does on ``model``: refused, or supported with its engine and trainability."""
    try:
        explain(model, x, name)
    except (ValueError, TypeError):
        return "refused"
    info = explainer_info(name)
    parts = ["yes"]
    if "engine" in info.options:
        try:
            explain(model, x, name, engine="chunked")
            parts = ["chunked"]
        except ValueError:
            parts = ["dense"]
    if info.differentiable and _trainable(model, x, name):
        parts.append("trainable")
    return ", ".join(parts)


def family_table() -> str:
    """The family table as Markdown, computed on the tiny models of :data:`FAMILIES`."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lines = [
        "| family | timm model | " + " | ".join(f"`{c}`" for c in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for family, (name, _) in FAMILIES.items():
        model = build_family(family)
        cells = [_cell(model, x, c) for c in COLUMNS]
        lines.append(f"| {family} | `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _committed_table() -> str:
    text = DOCS.read_text()
    found = re.search(r"<!-- family-table -->\n(.*?)\n<!-- /family-table -->", text, re.S)
    assert found, f"{DOCS} has no <!-- family-table --> block"
    return found.group(1).strip()


def test_the_family_table_in_the_docs_is_what_the_code_does():
    computed = family_table()
    assert computed == _committed_table(), (
        "docs/guide/explainers.md's family table differs from the code; the computed table:\n"
        + computed
    )


def _maps_and_grads(model, x, method, engine):
    """Maps ``(B, gh, gw)`` and the gradient of a loss on them for every parameter, flat."""
    model.zero_grad(set_to_none=True)
    target = torch.tensor([0, 3])
    kw = {"chunk_size": 5} if engine == "chunked" else {}
    maps = explain(model, x, method, target=target, differentiable=True, engine=engine, **kw)
    half = maps.shape[-2] // 2
    (maps[:, :half].sum() - maps[:, half:].sum()).backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return maps.detach(), torch.cat(grads)


@pytest.mark.parametrize("family", CHUNKED_SCOPE)
def test_the_chunked_engine_equals_the_dense_engine_on_every_family(family):
    model = build_family(family, dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert select_engine(model, "chefer", "chunked").kind == "chunked"

    def flat(engine: str) -> torch.Tensor:
        maps, grads = _maps_and_grads(model, x, "chefer", engine)
        return torch.cat([maps.flatten(), grads])

    dense = flat("dense")
    # two float64 evaluations of one exact quantity (maps, then every parameter gradient),
    # blocked differently
    bound = twin_bound(lambda: flat("dense"), u=U64)
    assert ((flat("chunked") - dense).abs() <= bound).all()
    assert dense.abs().max() > 0


def _naive_siglip_chefer(model, x, target):
    """Chefer relevance of an attention-pool model written from the rule in the docs: the blocks'
    attention read at ``attn_drop`` (fused attention off), the pool's recomputed from its own
    modules; ``r0 = mean_{h,l} clamp(dy/dA_pool * A_pool, 0)``, ``r <- r + r @ Abar_b`` from the
    last block to the first, patch columns."""
    pool = model.attn_pool
    seen = {}

    def pool_forward(tokens, attn_mask=None):
        b, n, c = tokens.shape
        q = pool.q(pool.latent.expand(b, -1, -1))
        q = q.reshape(b, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
        kv = pool.kv(tokens).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q, k = pool.q_norm(q), pool.k_norm(k)
        a = (q @ k.transpose(-2, -1) * pool.head_dim**-0.5).softmax(-1)
        seen["pool"] = a
        out = (a @ v).transpose(1, 2).reshape(b, pool.latent_len, c)
        out = pool.proj_drop(pool.proj(out))
        out = out + pool.mlp(pool.norm(out))
        return out[:, 0] if pool.pool == "token" else out.mean(1)

    pool.forward = pool_forward
    try:
        with AttentionCapture(model) as cap:
            logits = model(x)
        attentions = cap.attentions
        score = logits.gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(score, [*attentions, seen["pool"]])
    finally:
        del pool.forward
    r = (grads[-1] * seen["pool"]).clamp(min=0).mean(dim=(1, 2))
    for a, g in zip(reversed(attentions), reversed(grads[:-1]), strict=True):
        r = r + torch.bmm(r[:, None], (g * a).clamp(min=0).mean(1))[:, 0]
    return r.reshape(r.shape[0], 4, 4)


def test_attention_pooling_follows_the_documented_rule_and_trains():
    model = build_family("SigLIP (map)", dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([1, 2])
    naive = _naive_siglip_chefer(model, x, target).detach()
    for engine in ("dense", "chunked"):
        maps = explain(model, x, "chefer", target=target, engine=engine)
        torch.testing.assert_close(maps, naive, rtol=1e-10, atol=1e-14)  # float64 either way
    assert naive.abs().max() > 0
    assert _trainable(model, x, "chefer")
    model.zero_grad(set_to_none=True)
    explain(model, x, "chefer", differentiable=True).sum().backward()
    assert model.attn_pool.q.weight.grad.abs().sum() > 0  # the pool's own attention trains too


@pytest.mark.parametrize("method", ["chefer", "rollout", "raw_attention", "gradcam"])
def test_hierarchical_window_models_are_refused_before_the_forward_pass(method):
    model = build_family("Swin")
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError) as err:
        explain(model, torch.randn(1, 3, 32, 32), method)
    message = str(err.value)
    assert "SwinTransformer is a hierarchical window model" in message
    assert "saliency" in message and "windows" in message
    assert not calls
    assert explain(model, torch.randn(1, 3, 32, 32), "saliency").shape == (1, 32, 32)


@pytest.mark.parametrize("family", ["vit", "EVA-02", "BEiT"])
def test_gradient_checkpointing_keeps_the_chunked_engine_and_its_results(family):
    model = build_family(family, dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def flat() -> torch.Tensor:
        maps, grads = _maps_and_grads(model, x, "chefer", "chunked")
        return torch.cat([maps.flatten(), grads])

    plain = flat()
    bound = twin_bound(flat, u=U64)  # the same sums, in the recomputation's order
    model.set_grad_checkpointing(True)
    choice = select_engine(model, "chefer", "auto")
    assert (choice.kind, choice.keep) == ("chunked", "inputs")
    # engine="chunked" raises if a block's kernel call were recorded twice (the recomputation)
    assert ((flat() - plain).abs() <= bound).all()
    for method in ("rollout", "raw_attention"):
        model.set_grad_checkpointing(False)
        expected = explain(model, x, method, engine="chunked")
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(explain(model, x, method), expected, rtol=0, atol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_under_checkpointing_the_relevance_walk_saves_nothing_per_block(checkpointing):
    """Outside checkpointed regions, the trainable walk saves (for its backward pass) q, k, v and
    dy/dO per block; under checkpointing its steps are checkpointed too, and recompute them."""
    model = build_family("vit")
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 3, 32, 32)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4 and t.shape[-2] == 17:  # (B, heads, N, head_dim): what the walk keeps
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        explain(model, x, "chefer", differentiable=True, engine="chunked").sum().backward()
    per_block = 2 * model.blocks[0].attn.num_heads * 17 * model.blocks[0].attn.head_dim
    if checkpointing:
        assert sum(saved) == 0
    else:
        assert sum(saved) >= 4 * len(model.blocks) * per_block


def test_reentrant_checkpointing_is_refused_with_its_reason(monkeypatch):
    from timm.layers import config

    model = build_family("vit")
    model.set_grad_checkpointing(True)
    monkeypatch.setattr(config, "_USE_REENTRANT_CKPT", True)
    for engine in ("auto", "chunked", "dense"):
        with pytest.raises(ValueError, match="TIMM_REENTRANT_CKPT is set: reentrant checkpointing"):
            explain(model, torch.randn(1, 3, 32, 32), "chefer", engine=engine)


def test_a_siglip_model_fine_tunes_with_the_relevance_objective():
    from relreg.data import SpuriousShapes
    from relreg.lightning import RelRegModule

    module = RelRegModule(build_family("SigLIP (map)"))
    ds = SpuriousShapes("train", n=4)
    keys = ("image", "label", "mask", "has_mask")
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in keys}
    out = module.model_step(batch, training=True)
    assert {"loss_seg", "loss_cls"} <= set(out.terms) and out.maps.shape == (4, 4, 4)
    out.loss.backward()
    assert module.model.attn_pool.kv.weight.grad.abs().sum() > 0
    assert module.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_a_per_block_attention_bias_is_recomputed_not_kept():
    """BEiT computes a (1, heads, N, N) relative position bias in every block; the chunked engine
    keeps the blocks' inputs instead, so the trainable walk saves no bias for its backward pass
    (the tensors-keeping capture would save one per block), and trains the bias table the same."""
    from dataclasses import replace

    from relreg.explain import engine as engine_module

    model = build_family("BEiT", dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    choice = select_engine(model, "chefer", "chunked")
    assert choice.keep == "inputs" and "relative position bias" in choice.reason
    n = 17
    heads = model.blocks[0].attn.num_heads

    def run(keep: str) -> tuple[int, torch.Tensor]:
        saved = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if tuple(t.shape) == (1, heads, n, n):
                saved.append(t)
            return t

        original = engine_module.select_engine

        def forced(*args, **kwargs):
            return replace(original(*args, **kwargs), keep=keep)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("relreg.explain.attention.select_engine", forced)
            model.zero_grad(set_to_none=True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                explain(model, x, "chefer", differentiable=True, engine="chunked").sum().backward()
        table = model.blocks[0].attn.relative_position_bias_table.grad.clone()
        return len(saved), table

    kept, table_kept = run("tensors")
    recomputed, table_recomputed = run("inputs")
    assert kept >= len(model.blocks) and recomputed == 0
    assert table_kept.abs().max() > 0
    # float64, the same sums in two orders (a few hundred terms each): far inside 1e4 * U64
    assert (table_recomputed - table_kept).abs().max() <= 1e4 * U64 * table_kept.abs().max()
