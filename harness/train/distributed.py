"""`harness train` on several processes: `torchrun --nproc_per_node=N -m harness train ...` runs N
ranks with DistributedDataParallel (PyTorch docs, "Getting Started with DDP"; torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous variables). Without torchrun the world is one rank and
nothing here changes a step.

The global batch is what `--batch-size` and `--grad-accum` say: every rank draws the same batch
offsets from the same seeded generator and keeps its contiguous share of rows (`World.rows`), so one
process and N ranks see the very same sequences. The loss of a step is the mean over all of them:
each rank's mean is all-reduced and divided by N (equal shares, so this is the global mean), and DDP
averages the gradients the same way. The results agree up to the order of float reductions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from harness.api import HarnessError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def rows(self, batch_size: int) -> slice:
        """This rank's share of a global batch of batch_size sequences."""
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            up = (batch_size // self.size + 1) * self.size
            raise HarnessError(
                f"--batch-size {batch_size} is the global batch and must divide among {self.size} ranks; "
                f"use a multiple of {self.size} (e.g. --batch-size {up})"
            )

    def mean(self, value: float, device: str) -> float:
        """The mean of `value` over all ranks (each rank's mean over an equal share: the global mean)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item() / self.size

    def gather(self, obj: object) -> list[object]:
        """obj from every rank, in rank order (a collective: every rank must call it)."""
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def torchrun_world() -> World:
    """The world torchrun describes in the environment (one rank without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def rank0_speaks() -> Iterator[None]:
    """Every rank meets the same bad input: rank 0 lets the one-line HarnessError through (the CLI
    prints it, exit 2); the other ranks exit 2 silently, a second later, because torchrun stops the
    remaining ranks as soon as one exits and rank 0 must have printed by then."""
    try:
        yield
    except HarnessError:
        if torchrun_world().is_main:
            raise
        time.sleep(1.0)
        raise SystemExit(2) from None


def start(device: str) -> World:
    """Join the process group torchrun set up: gloo on CPU, nccl on CUDA (each rank on cuda:LOCAL_RANK)."""
    world = torchrun_world()
    if not world.distributed or dist.is_initialized():
        return world
    if device not in ("cpu", "cuda"):
        raise HarnessError(f"--device {device}: under torchrun pass --device cuda (rank i takes cuda:LOCAL_RANK)")
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)  # "cuda" then means this rank's GPU everywhere
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return world


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, world: World, device: str) -> torch.nn.Module:
    """module under DDP on a multi-rank world (rank 0's weights broadcast to all); module itself otherwise."""
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.local_rank] if device == "cuda" else None  # CPU (gloo): no device_ids
    return DistributedDataParallel(module, device_ids=ids)
