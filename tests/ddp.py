"""Two CPU processes joined by a gloo process group, for tests of what must agree across ranks."""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn: Callable, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_two_ranks(fn: Callable, *args: object) -> None:
    """Run ``fn(rank, *args)`` in 2 spawned processes inside a gloo process group (``fn`` must be
    a module-level function, so that it pickles)."""
    mp.spawn(_worker, args=(_free_port(), fn, args), nprocs=2, join=True)
