"""Data-parallel training over several processes, as `torchrun` or `accelerate launch --multi_gpu` start them.

The launchers set RANK, WORLD_SIZE and LOCAL_RANK; the studio joins the process group (NCCL on GPUs,
gloo on CPU), every rank computes its slice of each global batch, gradients are averaged before each
optimizer step, and only rank 0 writes files. Nothing here runs for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def world() -> World:
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def setup(w: World) -> None:
    """Join the process group once (a no-op for one process or when already joined)."""
    import torch
    import torch.distributed as dist

    if not w.parallel or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def barrier(w: World) -> None:
    if w.parallel:
        import torch.distributed as dist

        dist.barrier()


def average_(tensors, w: World) -> None:
    """Average tensors across ranks in place (gradients before an optimizer step)."""
    if not w.parallel:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(w.size)


def shard(batch: int, w: World):
    """The rows of a global batch this rank computes; all of them for one process."""
    import torch

    per = batch // w.size
    return torch.arange(w.rank * per, (w.rank + 1) * per)
