"""The group_dro term against group_DRO's own update (``LossComputer.compute_robust_loss`` of
kohpangwei/group_DRO, transcribed below from reading ``loss.py``), its buffer in checkpoints, its
refusals, ``relreg fit`` from YAML, and the same weights on every rank under DDP (2 processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from relreg.cli import main
from relreg.objective import GroupDROTerm, StepContext
from relreg.objective.context import ExplainerSpec
from tests.ddp import run_two_ranks


class Reference:
    """group_DRO's LossComputer (is_robust=True, no btl, no normalisation), on CPU."""

    def __init__(self, n_groups, step_size, adj=None, group_counts=None):
        self.n_groups = n_groups
        self.step_size = step_size
        self.adv_probs = torch.ones(n_groups) / n_groups
        self.adj = torch.zeros(n_groups) if adj is None else torch.tensor(adj).float()
        self.group_counts = None if group_counts is None else torch.tensor(group_counts).float()

    def loss(self, yhat, y, group_idx):
        per_sample = F.cross_entropy(yhat, y, reduction="none")
        group_map = (group_idx == torch.arange(self.n_groups).unsqueeze(1).long()).float()
        group_count = group_map.sum(1)
        group_denom = group_count + (group_count == 0).float()
        group_loss = (group_map @ per_sample.view(-1)) / group_denom
        adjusted = group_loss.clone()
        if torch.all(self.adj > 0):
            adjusted = adjusted + self.adj / torch.sqrt(self.group_counts)
        self.adv_probs = self.adv_probs * torch.exp(self.step_size * adjusted.data)
        self.adv_probs = self.adv_probs / self.adv_probs.sum()
        return group_loss @ self.adv_probs


def context(logits, labels, groups, training=True):
    batch = {
        "image": torch.zeros(len(labels), 3, 2, 2),
        "label": labels,
        "mask": torch.zeros(len(labels), 2, 2),
        "has_mask": torch.zeros(len(labels), dtype=torch.bool),
        "group": groups,
    }
    ctx = StepContext(torch.nn.Identity(), batch, ExplainerSpec(), False, training)
    ctx.__dict__["logits"] = logits  # the cached property, set directly
    return ctx


def batches(n_steps=6, b=16, k=3, g=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        groups = torch.randint(0, g - 1, (b,), generator=gen)  # group 3 never appears
        yield torch.randn(b, k, generator=gen), torch.randint(0, k, (b,), generator=gen), groups


@pytest.mark.parametrize("adjustment", [0.0, 2.0])
def test_weights_and_loss_follow_group_dros_update(adjustment):
    counts = [50, 10, 5, 2]
    term = GroupDROTerm(4, step_size=0.5, adjustment=adjustment, group_counts=counts)
    ref = Reference(4, 0.5, adj=[adjustment] * 4, group_counts=counts)
    for logits, labels, groups in batches():
        expected = ref.loss(logits, labels, groups)
        out = term(context(logits, labels, groups))
        torch.testing.assert_close(term.weights, ref.adv_probs)
        if adjustment == 0:  # group_DRO's returned loss also holds the adjustment (a constant)
            torch.testing.assert_close(out["loss_dro"], expected)
    assert term.weights[3] < term.weights[:3].min()  # the absent group's weight shrinks


def test_gradients_flow_through_the_group_losses_not_the_weights():
    term = GroupDROTerm(4, step_size=1.0)
    logits, labels, groups = next(batches())
    logits.requires_grad_(True)
    term(context(logits, labels, groups))["loss_dro"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert not term.weights.requires_grad


def test_validation_does_not_move_the_weights_and_the_weights_are_checkpointed():
    term = GroupDROTerm(4, step_size=1.0)
    logits, labels, groups = next(batches())
    term(context(logits, labels, groups, training=False))
    assert torch.equal(term.weights, torch.full((4,), 0.25))
    term(context(logits, labels, groups))
    state = term.state_dict()
    assert "weights" in state and not torch.equal(state["weights"], torch.full((4,), 0.25))
    fresh = GroupDROTerm(4, step_size=1.0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weights, term.weights)


def test_bad_options_and_batches_are_named():
    with pytest.raises(ValueError, match="Expected num_groups"):
        GroupDROTerm(0)
    with pytest.raises(ValueError, match="Expected group_counts of the 4 groups"):
        GroupDROTerm(4, adjustment=1.0)
    logits, labels, groups = next(batches())
    with pytest.raises(ValueError, match="Expected batch groups in \\[0, 2\\)"):
        GroupDROTerm(2)(context(logits, labels, groups + 1))
    ctx = context(logits, labels, groups)
    del ctx.batch["group"]
    with pytest.raises(ValueError, match="Expected batches with 'group'"):
        GroupDROTerm(4)(ctx)


def test_group_dro_trains_through_relreg_fit(tmp_path):
    config = tmp_path / "dro.yaml"
    config.write_text(
        f"""
trainer:
  default_root_dir: {tmp_path / "run"}
  max_steps: 3
  logger: false
  callbacks: []
  enable_checkpointing: false
  enable_progress_bar: false
model:
  model: vit_tiny_patch16_224
  num_classes: 4
  model_kwargs: {{img_size: 32, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}}
  objective: [{{term: group_dro, options: {{num_groups: 16, step_size: 0.1}}}}]
  explainer: {{evaluate: false}}
data:
  batch_size: 4
  balance: group
  train: {{class_path: relreg.data.SpuriousShapes, init_args: {{split: train, n: 16}}}}
"""
    )
    assert main(["fit", "--config", str(config)]) in (0, None)


def _rank(rank: int, out: str) -> None:
    term = GroupDROTerm(4, step_size=0.5)
    for logits, labels, groups in batches(seed=3):
        half = slice(0, 10) if rank == 0 else slice(10, 16)  # uneven shards of one batch
        term(context(logits[half], labels[half], groups[half]))
    torch.save(term.weights, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_every_rank_holds_the_weights_of_the_global_batch(tmp_path):
    run_two_ranks(_rank, str(tmp_path))
    single = GroupDROTerm(4, step_size=0.5)
    for logits, labels, groups in batches(seed=3):
        single(context(logits, labels, groups))
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), single.weights)
