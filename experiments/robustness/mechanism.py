"""Where a relevance-fine-tuned model still reads the cue: the mechanism study's measurements.

- :func:`rule_variants`: the gradient-weighted attention rule (``chefer``) and variants that drop
  one of its choices (:data:`VARIANTS`);
- :func:`patch_keys_values`: path patching, chosen tokens send another image's keys and/or values;
- :func:`value_flow`: how much of what the CLS and object tokens receive comes from chosen tokens;
- :class:`ValueBiasGauge` and :func:`gauge_shift`: a function-preserving reparametrisation that
  moves Chefer relevance;
- :func:`measure`: all of them plus the faithfulness test, for one model.

Used by ``experiments/robustness_mechanism.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from relreg.explain import AttentionCapture, explain, find_attention_modules, to_pixels
from relreg.losses import relevance_mass_loss, swap_backgrounds
from relreg.metrics import relevance_share
from robustness.faithfulness import faithfulness
from robustness.protocol import cue_region, make_split

EXPLAINERS = ["chefer", "rollout", "transformer_attribution", "input_x_gradient"]
# how each variant turns attention A and its gradient g, (B, h, N, N), into one (B, N, N) matrix
VARIANTS = {
    "positive_mean": lambda a, g: (g * a).clamp(min=0).mean(1),  # the chefer rule
    "negative_mean": lambda a, g: (g * a).clamp(max=0).neg().mean(1),
    "abs_mean": lambda a, g: (g * a).abs().mean(1),
    "positive_max_head": lambda a, g: (g * a).clamp(min=0).amax(1),
    # A * (g - sum_k A_ik g_ik): the gradient w.r.t. the attention logits, which the value-bias
    # gauge (ValueBiasGauge) does not change
    "positive_mean_logit_grad": lambda a, g: (
        (a * (g - (a * g).sum(-1, keepdim=True))).clamp(min=0).mean(1)
    ),
}


def rule_variants(model: torch.nn.Module, images: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Patch relevance ``(B, N - 1)`` of each :data:`VARIANTS` rule, CLS read-out.

    One forward pass records every block's attention ``A_b: (B, h, N, N)``, one backward pass the
    gradients ``g_b`` of the target logit; each variant reduces ``A_b`` and ``g_b`` over heads to
    ``Abar_b`` and propagates ``v <- v + v Abar_b`` from the last block to the first, starting
    from the CLS read-out ``v = e_0`` (``positive_mean`` is ``chefer``). Assumes one prefix token
    (CLS) and token pooling, as the study's model has.
    """
    with torch.enable_grad(), AttentionCapture(model) as capture:
        logits = model(images)
    attentions = capture.attentions
    score = logits.gather(1, target[:, None]).sum()
    grads = torch.autograd.grad(score, attentions)
    out = {}
    with torch.no_grad():
        for name, reduce in VARIANTS.items():
            v = torch.zeros_like(attentions[-1][:, 0, 0])
            v[:, 0] = 1
            for a, g in zip(reversed(attentions), reversed(grads), strict=True):
                v = v + torch.bmm(v.unsqueeze(1), reduce(a, g))[:, 0]
            out[name] = v[:, 1:]
    return out


@torch.no_grad()
def value_flow(model: torch.nn.Module, images: Tensor, senders: Tensor) -> dict[str, list[float]]:
    """Per block: how much of what the CLS and the object's tokens receive comes from ``senders``.

    For receiver ``i`` and head ``h``, the attention output splits into the part from the senders,
    ``sum_{j in S} A_hij v_hj``, and the rest; ``*_value_share`` is the norm of the first over the
    sum of both norms (mean over heads, images and, for ``object``, the object's tokens);
    ``*_attention`` is the attention mass ``sum_{j in S} A_hij`` itself. ``senders``: ``(B, N)``
    bool; the object's tokens are the other non-CLS tokens.
    """
    modules = find_attention_modules(model)
    values: list[Tensor] = []
    hooks = [m.qkv.register_forward_hook(lambda _m, _i, out: values.append(out)) for m in modules]
    try:
        with AttentionCapture(model) as capture:
            model(images)
    finally:
        for h in hooks:
            h.remove()
    s = senders.to(images.dtype)[:, None, None, :]  # (B, 1, 1, N)
    objects = ~senders
    objects[:, 0] = False
    out: dict[str, list[float]] = {k: [] for k in ("cls_attention", "cls_value_share")}
    out.update({"object_attention": [], "object_value_share": []})
    for a, qkv, m in zip(capture.attentions, values, modules, strict=True):
        b, n, _ = qkv.shape
        v = qkv[..., 2 * qkv.shape[-1] // 3 :].reshape(b, n, m.num_heads, -1).transpose(1, 2)
        from_s = (a * s) @ v  # (B, h, N, d)
        from_rest = (a * (1 - s)) @ v
        ns = from_s.norm(dim=-1)
        nr = from_rest.norm(dim=-1)
        share = (ns / (ns + nr).clamp_min(1e-12)).mean(1)  # (B, N)
        mass = (a * s).sum(-1).mean(1)  # (B, N)
        w = objects.to(share.dtype)
        per_image = w.sum(1).clamp_min(1)
        out["cls_attention"].append(round(mass[:, 0].mean().item(), 4))
        out["cls_value_share"].append(round(share[:, 0].mean().item(), 4))
        out["object_attention"].append(round(((mass * w).sum(1) / per_image).mean().item(), 4))
        out["object_value_share"].append(round(((share * w).sum(1) / per_image).mean().item(), 4))
    return out


class ValueBiasGauge:
    """A function-preserving reparametrisation: value bias ``b`` in, ``W_proj b`` out, per block.

    Adding ``b_l`` to every value of block ``l`` adds ``b_l`` to every attention output (each
    attention row sums to 1), and subtracting ``W_proj b_l`` after the output projection removes
    it again, so the network computes the same function for any ``b``. The gradient of a logit
    with respect to the post-softmax attention ``A_ij`` is ``<dy/dout_i, v_j>``: it shifts by
    ``<dy/dout_i, b>``, the same for every ``j`` of row ``i``, so gradient-weighted attention
    rules (``chefer``) depend on ``b``. Used as a context manager, it holds the hooks that apply
    ``self.bias: (blocks, dim)``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = find_attention_modules(model)
        dim = self.modules[0].qkv.out_features // 3
        p = self.modules[0].qkv.weight
        self.bias = torch.zeros(len(self.modules), dim, device=p.device, dtype=p.dtype)
        self.bias.requires_grad_(True)
        self.hooks: list = []

    def __enter__(self) -> ValueBiasGauge:
        for i, m in enumerate(self.modules):
            dim = self.bias.shape[1]

            def shift_values(_m, _i, out: Tensor, i: int = i, dim: int = dim) -> Tensor:
                pad = torch.zeros_like(self.bias[i]).repeat(2)
                return out + torch.cat([pad, self.bias[i]])

            def unshift_output(mod, _i, out: Tensor, i: int = i) -> Tensor:
                return out - mod.weight @ self.bias[i]

            self.hooks.append(m.qkv.register_forward_hook(shift_values))
            self.hooks.append(m.proj.register_forward_hook(unshift_output))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def gauge_shift(
    model: torch.nn.Module, images: Tensor, masks: Tensor, steps: int = 60, lr: float = 0.1
) -> dict[str, float]:
    """Move Chefer relevance onto the object without changing the function.

    Adam on the value-bias gauge (:class:`ValueBiasGauge`) only (the weights are untouched),
    minimising the share of Chefer relevance outside ``masks`` (the energy loss) through the
    second-order maps.

    Args:
        model: the model (its weights are not changed; left in train mode).
        images: ``(B, 3, H, W)`` images; the target is the predicted class.
        masks: ``(B, H, W)`` in {0, 1}, the objects.
        steps: Adam steps.
        lr: Adam's learning rate.

    Returns:
        The background share (:func:`relreg.metrics.relevance_share` of ``1 - masks``, min-max
        convention: the energy loss's) before
        and after, the largest change of any logit (0 up to rounding) and the bias's norm.
    """
    model.eval()
    with torch.no_grad():
        logits = model(images)
    target = logits.argmax(1)

    background = 1 - masks
    gauge = ValueBiasGauge(model)
    opt = torch.optim.Adam([gauge.bias], lr=lr)
    with gauge:
        maps = explain(model, images, "chefer", target=target)
        before = relevance_share(maps, background, convention="minmax").mean().item()
        for _ in range(steps):
            maps = explain(
                model, images, "chefer", target=target, differentiable=True, second_order=True
            )
            # the energy loss: the mean min-max share on the background, in the graph
            pix = to_pixels(maps, size=masks.shape[-2:])
            loss = relevance_mass_loss(pix, masks)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            change = (model(images) - logits).abs().max().item()
        maps = explain(model, images, "chefer", target=target)
        after = relevance_share(maps, background, convention="minmax").mean().item()
    model.train()
    return {
        "bg_share_before": round(before, 4),
        "bg_share_after": round(after, 4),
        "max_logit_change": change,
        "bias_norm": round(gauge.bias.norm().item(), 4),
    }


def cue_share(patches: Tensor, cue: Tensor) -> float:
    """Mean share of the relevance on the cue's pixels (:func:`relreg.metrics.relevance_share`).

    Args:
        patches: ``(B, P)`` patch relevance on a square grid, e.g. from :func:`rule_variants`.
        cue: ``(B, H, W)`` in {0, 1}, the cue's pixels.

    Returns:
        The mean over images, rounded to 4 digits.
    """
    side = int(patches.shape[1] ** 0.5)
    return round(relevance_share(patches.reshape(-1, side, side), cue).mean().item(), 4)


@torch.no_grad()
def patch_keys_values(
    model: torch.nn.Module, images: Tensor, counterfactual: Tensor, senders: Tensor
) -> dict[str, Tensor]:
    """Predictions ``(B,)`` when chosen tokens send the counterfactual's keys and/or values.

    Path patching at every block: a forward hook on each attention's ``qkv`` projection records
    the counterfactual run's keys and values, then, in runs on ``images``, overwrites them for the
    ``senders`` tokens (``(B, N)`` bool): keys only (the tokens change how every token weighs the
    others, through the softmax), values only (what they pass on), or both (everything they send;
    the receivers, CLS included, keep their own queries). Returns the predictions of each run and
    of the plain runs on ``images`` and ``counterfactual``.
    """
    modules = find_attention_modules(model)
    recorded: list[Tensor] = []
    hooks = [m.qkv.register_forward_hook(lambda _m, _i, out: recorded.append(out)) for m in modules]
    try:
        preds = {"counterfactual": model(counterfactual).argmax(1)}
    finally:
        for h in hooks:
            h.remove()
    preds["original"] = model(images).argmax(1)
    dim = recorded[0].shape[-1] // 3
    parts = {"keys": slice(dim, 2 * dim), "values": slice(2 * dim, 3 * dim)}
    for name, slices in (
        ("keys", [parts["keys"]]),
        ("values", [parts["values"]]),
        ("keys_and_values", [parts["keys"], parts["values"]]),
    ):

        def patch(block: int, _m: torch.nn.Module, _i: tuple, out: Tensor, slices=slices) -> Tensor:
            out = out.clone()
            sel = senders.unsqueeze(-1)
            for sl in slices:
                out[..., sl] = torch.where(sel, recorded[block][..., sl], out[..., sl])
            return out

        hooks = [
            m.qkv.register_forward_hook(lambda mod, i, o, b=b: patch(b, mod, i, o))
            for b, m in enumerate(modules)
        ]
        try:
            preds[name] = model(images).argmax(1)
        finally:
            for h in hooks:
                h.remove()
    return preds


def measure(cfg: dict, model: torch.nn.Module, kind: str) -> dict:
    """Faithfulness test plus the rule variants' cue shares, on the study's OOD images.

    Args:
        cfg: the study's config (``cfg["faithfulness"]``: the images and explainers).
        model: the model to measure (left in train mode).
        kind: the benchmark.

    Returns:
        :func:`robustness.faithfulness.faithfulness`'s result plus ``rule_variants`` (cue share
        per :data:`VARIANTS` rule), ``patching`` (per route of :func:`patch_keys_values`: the
        flips and the predictions that follow the swapped-in cue) and ``value_flow``.
    """
    result = faithfulness(cfg, model, kind)
    model.eval()
    data = make_split(cfg, kind, "ood", cfg["faithfulness"]["n"], seed=2)
    with torch.no_grad():
        pred = model(data["image"]).argmax(1)
    cue = cue_region(data["image"], data["mask"], kind)
    variants = rule_variants(model, data["image"], pred)
    result["rule_variants"] = {name: cue_share(v, cue) for name, v in variants.items()}
    # the rule re-implemented here is relreg's chefer: the same maps
    reference = explain(model, data["image"], "chefer", target=pred)
    torch.testing.assert_close(
        variants["positive_mean"].reshape(reference.shape), reference, rtol=1e-4, atol=1e-6
    )
    # which route does the background take? its tokens send another image's keys and/or values
    fg = data["mask"].unsqueeze(1)
    patch = cfg["model"]["kwargs"]["patch_size"]
    touched = F.max_pool2d(fg, patch).flatten(1) > 0  # (B, P): patches the object touches
    senders = torch.cat([torch.zeros_like(touched[:, :1]), ~touched], 1)  # CLS never sends
    preds = patch_keys_values(
        model, data["image"], swap_backgrounds(data["image"], data["mask"]), senders
    )
    new_cue = data["cue"].roll(1, 0)  # swap_backgrounds: image i gets image i - 1's background
    result["patching"] = {
        name: {
            "flips": round((p != preds["original"]).float().mean().item(), 4),
            "follows_new_cue": round((p == new_cue).float().mean().item(), 4),
        }
        for name, p in preds.items()
        if name != "original"
    }
    result["value_flow"] = value_flow(model, data["image"], senders)
    model.train()
    return result
