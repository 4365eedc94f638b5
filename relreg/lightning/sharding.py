"""Fully sharded data parallelism (FSDP2) for the relevance-regularised step.

``torch.distributed.fsdp.fully_shard`` (FSDP2; Zhao et al., "PyTorch FSDP: Experiences on Scaling
Fully Sharded Data Parallel", VLDB 2023) shards every parameter across the data-parallel mesh and
gathers one block's parameters at a time around its forward and backward passes. Lightning runs
it through :class:`pytorch_lightning.strategies.ModelParallelStrategy`, which calls
:meth:`relreg.lightning.RelRegModule.configure_model`, which calls :func:`shard_model`: one FSDP
unit per residual block (the unit the chunked relevance engine reads attention in), then the
root (patch embedding, head, the rest).

What the relevance step needs from FSDP, and gets:

- The chunked engine's capture keeps ``q``, ``k``, ``v`` and the kernel output of each block from
  the forward pass; these are activations, not parameters, so FSDP's resharding after the forward
  pass cannot make them stale.
- Its ``dy/dO`` pass (``torch.autograd.grad`` to the kernel outputs) runs the blocks' backward
  hooks, which gather each block's parameters again and reshard them; it accumulates no
  parameter gradient, so FSDP reduce-scatters nothing until the loss's backward pass
  (tests/lightning/test_fsdp.py counts the collectives).
- The masked-subset means of the relevance loss are per rank, as under DDP: give every rank the
  same number of masked samples for a step equal to the single-process one.

- Under gradient checkpointing the chunked engine reruns each block up to its kernel call
  (:func:`relreg.explain.capture.rerun_kernel_call`): the rerun goes through the block's FSDP
  pre-forward hook, which gathers its parameters (one more all-gather per block, counted in the
  test), and :func:`relreg.explain.chunked.block_step` reshards them after the step, so no block
  stays gathered between the walk and the backward pass. In the loss's backward pass the walk's
  recomputation gathers each block once more, and the model's backward once again: one
  all-gather per block more in each pass than without checkpointing, the price of recomputing.
"""

from __future__ import annotations

from torch import nn

from relreg.explain.capture import kernel_blocks

__all__ = ["check_shardable", "is_sharded", "shard_model"]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def check_shardable(model: nn.Module) -> list[nn.Module]:
    """The blocks :func:`shard_model` makes FSDP units of.

    Raises:
        ValueError: for a model without a list of residual blocks.
    """
    blocks = kernel_blocks(model)
    if not blocks:
        raise ValueError(
            f"Expected a model with a list of residual blocks (timm's model.blocks, or "
            f"model.kernel_blocks()) to shard with FSDP, but {type(model).__name__} has none."
        )
    return blocks


def shard_model(model: nn.Module, mesh: object, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 to ``model`` in place: each residual block, then the root.

    Args:
        model: a ViT with ``model.blocks`` (or ``model.kernel_blocks()``).
        mesh: the 1-d data-parallel ``DeviceMesh`` (ModelParallelStrategy's
            ``device_mesh["data_parallel"]``).
        reshard_after_forward: free each block's gathered parameters after its forward pass (and
            gather them again for the backward pass): FSDP's ZeRO-3 behaviour, its default.

    Returns:
        ``model`` (now an ``FSDPModule``; already sharded models are returned as they are).

    Raises:
        ValueError: see :func:`check_shardable`.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    for block in check_shardable(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model
