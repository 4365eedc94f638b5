"""Benchmark: the cost of the relevance loss in a training step, against a plain fine-tune step.

Cases (one optimiser step each, the same AdamW and classification term):
- ``plain``: cross-entropy fine-tune step (timm's fused attention), no relevance;
- ``first_order``: relreg's step, ``differentiable=True`` (the paper's rule: attention gradients
  as constants), one forward pass for logits and relevance, the default chunked engine (fused
  attention kept, attention recomputed by chunks of query rows, :mod:`relreg.explain.chunked`);
- ``first_order_dense``: the same step with ``engine="dense"`` (fused attention off, every
  block's ``(B, heads, N, N)`` attention and gradient stored): the reference;
- ``second_order``: relreg's step with ``second_order=True`` (``create_graph=True``; dense);
- ``two_forward``: a RobustViT-style step reproduced here: dense relevance from one forward pass
  and the classification loss from a second forward pass;
- ``attnlrp``: RobustViT's loss on ``attnlrp`` maps (CP-LRP, no Gamma rule). A second-order step:
  the map is a gradient, so its loss is backpropagated through the rules' backward pass
  (``create_graph=True``), on the dense attention path (the fused kernel has no second
  derivative), and the classification loss takes a second, unmodified forward pass.

Each case runs in its own subprocess so that its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the growth of the process's peak RSS over the RSS after
the model, optimiser and batch are set up (``step_peak_mb``; ``peak_mb`` is the whole process).
On every device, ``graph_mb`` counts the bytes of the tensors the autograd graph saves for the
backward pass (parameters excluded): exact and independent of the allocator.
``phases_s`` splits each step: ``forward``, ``input_gradient_backward`` (the backward pass that
gives ``dy/dO`` or ``dy/dA``), ``relevance_forward`` / ``relevance_backward`` (the chunked
engine's propagation; the dense engine's is inside ``other`` / ``final_backward``),
``final_backward`` (the loss's backward, relevance backward excluded) and ``other`` (optimiser,
loss, maps). Reports the median of the repetitions after one warm-up step (the mean with
``--relevance-every`` k > 1), and ratios to ``plain`` from the same run. Writes JSON and a figure.
``--sweep`` instead runs plain, dense and chunked steps of ViT-S/16 at 224, 384 and 512 px
(N = 197, 577, 1025 tokens), batch 4, and writes ``*_tokens.json`` / ``.png``.
``--families`` instead runs the plain and the chunked first-order step of every timm ViT family the
chunked engine reads (:data:`FAMILIES`: ViT, EVA-02, DINOv2 with registers, RoPE-ViT, SigLIP, BEiT
v2; random weights), batch 2, at ``--img-size`` (default 384, rounded up to a multiple of each
model's patch size: 392 for patch 14), with ``--grad-checkpointing`` both steps under timm's
non-reentrant gradient checkpointing; it writes ``*_families.json`` / ``.png`` (another size or
checkpointing: ``*_families_<size>[_ckpt].json``). Its relevance step is asserted to run on the
chunked engine (``engine="chunked"``: no fall-back to the dense one).

    python experiments/bench_train.py --out experiments/results/bench_train.json
    python experiments/bench_train.py --sweep --out experiments/results/bench_train.json
    python experiments/bench_train.py --quick --out /tmp/bench_train.json    # ViT-S only, < 3 min
    python experiments/bench_train.py --families --repeats 2    # writes *_families.json
    python experiments/bench_train.py --families --grad-checkpointing --repeats 2    # *_384_ckpt
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bench_train_plots import PHASES, plot, plot_families, plot_sweep  # this script's folder
from floors import phase_floors, step_floors, throughputs  # this script's folder
from machine_info import machine  # experiments/machine_info.py (this script's folder)

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from relreg.lightning import RelRegModule

CASES = (
    "plain",
    "first_order",
    "first_order_deferred",
    "first_order_dense",
    "second_order",
    "two_forward",
    "attnlrp",
)
SWEEP_CASES = ("plain", "first_order_dense", "first_order")
MODELS = {
    "vit_small_224": ("vit_small_patch16_224", {}, 224),
    "vit_tiny_32": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 32),
    "vit_small_384": ("vit_small_patch16_224", {"img_size": 384}, 384),
    "vit_small_512": ("vit_small_patch16_224", {"img_size": 512}, 512),
}
SWEEP_MODELS = ("vit_small_224", "vit_small_384", "vit_small_512")
# --families: the ViT-S-sized variant of each family (ViT-B where timm has no smaller one) and
# its patch size; built at --img-size (rounded up to a multiple of the patch size)
FAMILIES = {
    "vit": ("vit_small_patch16_224", 16),
    "eva02": ("eva02_small_patch14_224", 14),  # rotary (EvaAttention)
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", 14),  # 4 register tokens
    "rope_vit": ("vit_small_patch16_rope_224", 16),  # rotary (EvaAttention)
    "siglip": ("vit_base_patch16_siglip_224", 16),  # attention-pool read-out (global_pool="map")
    "beitv2": ("beitv2_base_patch16_224", 16),  # relative position bias
}
FAMILY_CASES = ("plain", "first_order", "first_order_deferred")
FAMILY_IMG_SIZE = 384
FAMILY_BATCH = 2
# the targets for the relevance step's step peak memory over the plain step's
FAMILY_TARGETS = {False: 1.15, True: 1.3}  # keyed by --grad-checkpointing


def family_size(img_size: int, patch: int) -> int:
    """``img_size`` rounded up to a multiple of ``patch`` (384 -> 392 for patch 14)."""
    return -(-img_size // patch) * patch


def _model_spec(model_key: str, img_size: int | None) -> tuple[str, dict, int]:
    """The timm name, ``create_model`` arguments and image size of a model key."""
    if model_key in FAMILIES:
        name, patch = FAMILIES[model_key]
        size = family_size(img_size or FAMILY_IMG_SIZE, patch)
        return name, {"img_size": size}, size
    return MODELS[model_key]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _install_timers(model, sync):  # noqa: ANN001, ANN202
    """Accumulate the time of each phase of a step (see the module docstring) into a dict.

    Returns:
        The dict of seconds per phase and a function that removes the timers.
    """
    import torch

    from relreg.explain.chunked import _RowTimesAttention

    acc = dict.fromkeys(PHASES, 0.0)

    def timed(name: str, fn):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            acc[name] += time.perf_counter() - t0
            return out

        return wrapper

    original_grad = torch.autograd.grad
    original_forward = vars(_RowTimesAttention)["forward"]
    original_backward = vars(_RowTimesAttention)["backward"]

    def restore() -> None:
        torch.autograd.grad = original_grad
        _RowTimesAttention.forward = original_forward
        _RowTimesAttention.backward = original_backward

    torch.autograd.grad = timed("input_gradient_backward", torch.autograd.grad)
    for name, attr in (("relevance_forward", "forward"), ("relevance_backward", "backward")):
        original = getattr(_RowTimesAttention, attr)
        setattr(_RowTimesAttention, attr, staticmethod(timed(name, original)))
    start: list[float] = []

    def before(m, a) -> None:  # noqa: ANN001
        sync()
        start.append(time.perf_counter())

    model.register_forward_pre_hook(before)

    def after(m, a, o) -> None:  # noqa: ANN001
        sync()
        acc["forward"] += time.perf_counter() - start.pop()

    model.register_forward_hook(after)
    return acc, restore


def worker(
    model_key: str,
    case: str,
    batch: int,
    repeats: int,
    device: str,
    relevance_every: int,
    img_size: int | None = None,
    grad_checkpointing: bool = False,
) -> dict:
    """Run one case in this process; returns its timings and memory."""
    import torch

    torch.manual_seed(0)
    module = _build_module(model_key, case, device, img_size, grad_checkpointing)
    optimizer = module.configure_optimizers()["optimizer"]
    size = _model_spec(model_key, img_size)[2]
    data = _batch(batch, size, device)
    engine = _check_engine(module, model_key, case)

    def forward_loss(relevance: bool) -> Tensor:
        return _forward_loss(module, data, case, relevance)

    sync = _synchronizer(device)
    acc, restore_timers = _install_timers(module.model, sync)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    try:
        times, phases = _time_steps(
            forward_loss, optimizer, acc, sync, case != "plain", repeats, relevance_every
        )
    finally:
        restore_timers()
    # With the relevance loss every k steps the cost alternates: the mean is the cost per step.
    middle = statistics.median if relevance_every == 1 else statistics.fmean
    result = {"step_s": middle(times), "step_s_all": [round(t, 4) for t in times]}
    result["phases_s"] = {k: round(middle([p[k] for p in phases]), 4) for k in PHASES}
    if hasattr(module.model, "blocks"):  # each phase's compute floor at rates measured now
        result["rates"] = throughputs(module.model, batch)
        result["flop_floors_s"] = phase_floors(module.model, batch, result["rates"])
    result["graph_mb"] = _graph_mb(module, lambda: forward_loss(case != "plain"))
    result.update(_peak_memory(device, base_rss))
    if device == "cpu":
        result["heap_step_peak_mb"] = _heap_step_peak(
            lambda: forward_loss(case != "plain"), optimizer
        )
    if model_key in FAMILIES:
        if engine == "chunked":  # the chunked engine's propagation ran in every timed step
            assert all(p["relevance_backward"] > 0 for p in phases), "no chunked relevance ran"
        model = module.model
        result["img_size"] = size
        result["tokens"] = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
        result["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        result["engine"] = engine
        result["grad_checkpointing"] = grad_checkpointing
    return result


def _check_engine(module: RelRegModule, model_key: str, case: str) -> str | None:
    """``--families``: the engine the relevance step runs on, asserted chunked (None: plain)."""
    from relreg.explain import select_engine

    if model_key not in FAMILIES or case == "plain":
        return None
    kind = select_engine(module.model, "chefer", "auto").kind
    assert kind == "chunked", f"{model_key}: the relevance step would run on the {kind} engine"
    # engine="chunked" in the module's explainer options: a fall-back would raise, not run
    assert module.explainer.options.get("engine") == "chunked", module.explainer.options
    return kind


def _build_module(
    model_key: str,
    case: str,
    device: str,
    img_size: int | None = None,
    grad_checkpointing: bool = False,
) -> RelRegModule:
    """The case's module: its explainer settings and objective, on ``device``."""
    import functools

    import torch

    from relreg.lightning import RelRegModule
    from relreg.objective import ROBUSTVIT

    name, kwargs, _ = _model_spec(model_key, img_size)
    explainer = {"second_order": case == "second_order"}
    if case == "first_order_dense":
        explainer["engine"] = "dense"
    if case == "first_order_deferred":
        explainer["options"] = {"defer_gradients": True}
    if case == "attnlrp":
        explainer = {"method": "attnlrp"}
    if model_key in FAMILIES and case.startswith("first_order"):
        explainer["engine"] = "chunked"  # raises rather than falling back to the dense engine
    # plain: the classification term only (RobustViT's 0.2); the others: RobustViT's objective
    objective = [{"term": "classification", "weight": 0.2}] if case == "plain" else list(ROBUSTVIT)
    module = RelRegModule(
        name,
        num_classes=1000,
        model_kwargs=kwargs,
        explainer=explainer,
        objective=objective,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-6, weight_decay=1e-4),
    )
    if grad_checkpointing:
        module.model.set_grad_checkpointing(True)  # timm's, non-reentrant by default
    return module.to(device)


def _batch(batch: int, size: int, device: str) -> dict[str, Tensor]:
    """Random images, each with a centred square mask, labels ``0..9`` in turn."""
    import torch

    images = torch.randn(batch, 3, size, size, device=device)
    masks = torch.zeros(batch, size, size, device=device)
    masks[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return {
        "image": images,
        "label": torch.arange(batch, device=device) % 10,
        "mask": masks,
        "has_mask": torch.ones(batch, dtype=torch.bool, device=device),
    }


def _forward_loss(
    module: RelRegModule, data: dict[str, Tensor], case: str, relevance: bool
) -> Tensor:
    from relreg.objective import StepContext

    if case == "two_forward":
        return _two_forward_loss(module, data)
    if relevance or not module.objective.needs_maps:
        return module.model_step(data, training=True).loss
    # a step without maps under --relevance-every k > 1 (no trainer here: the module's own
    # count of steps stays 0, so the step is built as model_step builds it, maps off)
    ctx = StepContext(module.model, data, module.explainer, maps_on=False, training=True)
    return module.objective(ctx).loss


def _two_forward_loss(module: RelRegModule, data: dict[str, Tensor]) -> Tensor:
    """RobustViT's step: dense relevance from one forward pass, the classification from another."""
    from relreg.explain import explain, to_pixels
    from relreg.losses import classification_loss

    images = data["image"]
    masks = data["mask"]
    maps = explain(
        module.model,
        images,
        "chefer",
        target=data["label"],
        differentiable=True,
        engine="dense",
    )
    pixels = to_pixels(maps, size=tuple(masks.shape[-2:]))
    rel = module.objective.terms[0].loss(pixels, masks, data["has_mask"])["loss"]
    # RobustViT's second forward pass, for the classification term
    logits = module.model(images)
    lambda_seg, lambda_cls = module.objective.weights
    return lambda_seg * rel + lambda_cls * classification_loss(logits, "self")


def _synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op off CUDA)."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return sync


def _step(
    forward_loss: Callable[[bool], Tensor],
    optimizer: torch.optim.Optimizer,
    acc: dict[str, float],
    sync: Callable[[], None],
    relevance: bool,
) -> dict[str, float]:
    """One optimiser step; returns the seconds of each phase."""
    t_start = time.perf_counter()
    before = dict(acc)
    loss = forward_loss(relevance)
    optimizer.zero_grad(set_to_none=True)
    sync()
    t0 = time.perf_counter()
    loss.backward()
    sync()
    backward = time.perf_counter() - t0
    optimizer.step()
    sync()
    phases = {k: acc[k] - before[k] for k in PHASES}
    phases["final_backward"] = backward - phases["relevance_backward"]
    phases["other"] = time.perf_counter() - t_start - sum(phases.values())
    return phases


def _time_steps(
    forward_loss: Callable[[bool], Tensor],
    optimizer: torch.optim.Optimizer,
    acc: dict[str, float],
    sync: Callable[[], None],
    with_relevance: bool,
    repeats: int,
    relevance_every: int,
) -> tuple[list[float], list[dict[str, float]]]:
    """A warm-up step, then ``repeats`` timed ones: their seconds and their phases."""
    times = []
    phases = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        split = _step(
            forward_loss, optimizer, acc, sync, with_relevance and i % relevance_every == 0
        )
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
            phases.append(split)
    return times, phases


def _graph_mb(module: RelRegModule, loss_fn: Callable[[], Tensor]) -> float:
    """Megabytes the autograd graph of ``loss_fn()`` saves for backward (parameters excluded)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(saved.values()) / 2**20


def _heap_in_use_mb() -> float | None:
    """Bytes glibc's malloc has handed out and not taken back (``mallinfo2``), in MB; None where
    the C library has no ``mallinfo2`` (not glibc >= 2.33)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
            .split()
        ]  # fmt: skip

    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    info = fn()
    return (info.uordblks + info.hblkhd) / 2**20  # small-block and mmap-ed bytes in use


def _heap_step_peak(
    loss_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer
) -> float | None:
    """One more (untimed) step's peak of the C heap in use over the heap before it, in MB, read
    after every operator (a dispatch mode): the tensors the step allocates, freed or not, without
    the allocator's fragmentation that the process's RSS also counts. The CPU's counterpart of
    ``torch.cuda.max_memory_allocated``; the optimiser state and the parameters exist before the
    step, so neither is counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if _heap_in_use_mb() is None:
        return None

    class Peak(TorchDispatchMode):
        peak = 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, _heap_in_use_mb())
            return out

    optimizer.zero_grad(set_to_none=True)
    base = _heap_in_use_mb()
    with Peak() as mode:
        loss = loss_fn()
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return round(mode.peak - base, 1)


def _peak_memory(device: str, base_rss: float) -> dict[str, float]:
    """``peak_mb`` of the process and ``step_peak_mb`` of the steps (CUDA: the same number)."""
    import torch

    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"peak_mb": peak, "step_peak_mb": peak}
    return {"peak_mb": _rss_mb(), "step_peak_mb": _rss_mb() - base_rss}


def run_case(model_key: str, case: str, args: argparse.Namespace) -> dict:
    if args.same_process:  # smoke tests: one import for all cases, memory not isolated
        return worker(
            model_key,
            case,
            args.batch,
            args.repeats,
            args.device,
            args.relevance_every,
            args.img_size,
            args.grad_checkpointing,
        )
    cmd = [sys.executable, __file__, "--worker", "--model", model_key, "--case", case]
    cmd += ["--batch", str(args.batch), "--repeats", str(args.repeats), "--device", args.device]
    cmd += ["--relevance-every", str(args.relevance_every), "--img-size", str(args.img_size)]
    cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _floor_ratios(case: dict, plain: dict) -> dict:
    """Each phase's floor (:func:`floors.step_floors`), its time over that floor, and the step's
    floor over the plain step's time."""
    if "flop_floors_s" not in case:
        return {}
    floors = step_floors(case["flop_floors_s"], plain["phases_s"])
    used = {k: v for k, v in case["phases_s"].items() if v > 0}
    return {
        "floors_s": floors,
        "phases_over_floor": {k: round(v / floors[k], 2) for k, v in used.items() if floors[k] > 0},
        "floor_over_plain_step": round(sum(floors[k] for k in used) / plain["step_s"], 3),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def _ratios(cases: dict) -> dict:
    plain = cases["plain"]
    return {
        c: {
            "time_ratio": round(r["step_s"] / plain["step_s"], 3),
            "memory_ratio": round(r["step_peak_mb"] / max(plain["step_peak_mb"], 1e-9), 3),
            "heap_memory_ratio": _ratio(r.get("heap_step_peak_mb"), plain.get("heap_step_peak_mb")),
            "process_memory_ratio": round(r["peak_mb"] / plain["peak_mb"], 3),
            "graph_ratio": round(r["graph_mb"] / plain["graph_mb"], 3),
            "phases_over_plain_step": {
                k: round(v / plain["step_s"], 3) for k, v in r["phases_s"].items()
            },
            **_floor_ratios(r, plain),
        }
        for c, r in cases.items()
    }


def _run_all(models: list[str], cases: tuple[str, ...], args: argparse.Namespace) -> dict:
    out = {}
    for m in models:
        results = {}
        for case in cases:
            c = run_case(m, case, args)
            results[case] = c
            print(
                f"{m:14s} {case:18s} {c['step_s']:.3f} s/step  "
                f"step peak {c['step_peak_mb']:.0f} MB (heap {c.get('heap_step_peak_mb')} MB)  "
                f"process peak {c['peak_mb']:.0f} MB  graph {c['graph_mb']:.0f} MB",
                flush=True,
            )
            if "flop_floors_s" in c and case != "plain":
                floors = step_floors(c["flop_floors_s"], results["plain"]["phases_s"])
                split = "  ".join(
                    f"{k} {v:.3f} (floor {floors[k]:.3f})"
                    for k, v in c["phases_s"].items()
                    if v > 0
                )
                print(f"{'':14s} {split}  rates {c['rates']}", flush=True)
        out[m] = {"cases": results, "ratios": _ratios(results)}
    return out


def families_path(out: Path, img_size: int, grad_checkpointing: bool) -> Path:
    """``<out stem>_families.json``; another size or checkpointing: ``_families_<size>[_ckpt]``."""
    suffix = "" if img_size == FAMILY_IMG_SIZE and not grad_checkpointing else f"_{img_size}"
    suffix += "_ckpt" if grad_checkpointing else ""
    return out.with_name(f"{out.stem}_families{suffix}.json")


def _run_families(result: dict, args: argparse.Namespace) -> None:
    """``--families``: plain and chunked first-order steps of each family; JSON and figure."""
    keys = args.families or list(FAMILIES)
    target = FAMILY_TARGETS[args.grad_checkpointing]
    result.update(
        img_size_asked=args.img_size,
        grad_checkpointing=args.grad_checkpointing,
        memory_ratio_target=target,
    )
    # defer_gradients has no effect under checkpointing (nothing waits in autograd's buffers)
    cases = FAMILY_CASES[:2] if args.grad_checkpointing else FAMILY_CASES
    result["families"] = _run_all(keys, cases, args)
    for key, row in result["families"].items():
        name, patch = FAMILIES[key]
        relevance = row["cases"]["first_order"]
        row.update(timm_name=name, patch_size=patch, img_size=relevance["img_size"])
        row.update(tokens=relevance["tokens"], engine=relevance["engine"])
        row["meets_memory_target"] = {
            f"{case}, {measure}": row["ratios"][case][measure] <= target
            for case in cases[1:]
            for measure in ("memory_ratio", "heap_memory_ratio")
            if row["ratios"][case][measure] is not None
        }
    out = families_path(args.out, args.img_size, args.grad_checkpointing)
    out.write_text(json.dumps(result, indent=2))
    plot_families(result, out.with_suffix(".png"))
    measures = ("memory_ratio", "heap_memory_ratio", "time_ratio")
    summary = {
        k: {c: {x: r["ratios"][c][x] for x in measures} for c in cases[1:]}
        | {"meets_memory_target": r["meets_memory_target"]}
        for k, r in result["families"].items()
    }
    print(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=list(MODELS),
        help="default: vit_small_224 and vit_tiny_32 (with --sweep: ViT-S at 224, 384, 512 px)",
    )
    parser.add_argument("--cases", nargs="+", default=None, choices=CASES, help="default: all")
    parser.add_argument("--batch", type=int, default=None, help="default 16 (4 with --sweep)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--relevance-every", type=int, default=1, help="relevance loss every k steps"
    )
    parser.add_argument("--quick", action="store_true", help="ViT-S only, batch 8, 2 repeats")
    parser.add_argument("--sweep", action="store_true", help="the token-count sweep instead")
    parser.add_argument(
        "--families",
        nargs="*",
        default=None,
        choices=list(FAMILIES),
        help="plain and chunked steps of every timm ViT family instead (or of those named)",
    )
    parser.add_argument(
        "--img-size",
        type=int,
        default=FAMILY_IMG_SIZE,
        help="--families: image size, rounded up to a multiple of the patch size (default 384)",
    )
    parser.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="--families: timm's gradient checkpointing on (model.set_grad_checkpointing(True))",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_train.json"))
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run every case in this process (faster; peak memory not per case: smoke tests only)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="vit_small_224", help=argparse.SUPPRESS)
    parser.add_argument("--case", default="plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.batch is None:
        args.batch = 4 if args.sweep else FAMILY_BATCH if args.families is not None else 16
    if args.worker:
        result = worker(
            args.model,
            args.case,
            args.batch,
            args.repeats,
            args.device,
            args.relevance_every,
            args.img_size,
            args.grad_checkpointing,
        )
        print(json.dumps(result))
        return
    if args.quick and not args.sweep:
        args.models = ["vit_small_224"]
        args.batch = 8
        args.repeats = 2
    result = {
        "device": args.device,
        "batch": args.batch,
        "repeats": args.repeats,
        "relevance_every": args.relevance_every,
        "machine": machine(args.device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.families is not None:
        _run_families(result, args)
        return
    if args.sweep:
        models = args.models or list(SWEEP_MODELS)
        cases = tuple(c for c in SWEEP_CASES[1:] if c in (args.cases or SWEEP_CASES))
        result["sweep"] = _run_all(models, ("plain",) + cases, args)
        for m, row in result["sweep"].items():
            _, kwargs, size = MODELS[m]
            row["img_size"] = size
            row["tokens"] = (size // kwargs.get("patch_size", 16)) ** 2 + 1
        out = args.out.with_name(args.out.stem + "_tokens.json")
        out.write_text(json.dumps(result, indent=2))
        plot_sweep(result, out.with_suffix(".png"))
        print(json.dumps({m: r["ratios"] for m, r in result["sweep"].items()}, indent=2))
        return
    args.models = args.models or ["vit_small_224", "vit_tiny_32"]
    cases = ("plain",) + tuple(c for c in CASES[1:] if c in (args.cases or CASES))
    result["models"] = _run_all(args.models, cases, args)
    main_model = "vit_small_224" if "vit_small_224" in result["models"] else args.models[0]
    result["cases"] = result["models"][main_model]["cases"]
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({m: r["ratios"] for m, r in result["models"].items()}, indent=2))


if __name__ == "__main__":
    main()
