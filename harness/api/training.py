"""Small pieces that tasks training their own models share with the adapters that train them:
a `Recipe` (the ladder's training hyper-parameters), CPU thread control and right padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op CPU threads (0: leave torch's setting), restoring it afterwards. The
    ladder's matrices are tiny: on a busy 2-core machine a second thread made training 10-20x slower."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Recipe:
    """How a neural rung is trained; counting rungs read all the data once and ignore it."""

    steps: int
    batch_size: int
    block: int  # window length when the data is one stream; rows are used whole
    lr: float
    seed: int  # drives the batches: every model given the same seed sees the same ones
    grad_clip: float | None = 1.0
    schedule: str = "constant"  # learning rate: "constant" or "cosine" (down to 0 at the last step)



def pad_right(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token lists -> ids (B, T) padded on the right with pad_id, and a mask (B, T) of 1 for real tokens."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row, dtype=torch.long), 1
    return ids.to(device), mask.to(device)
