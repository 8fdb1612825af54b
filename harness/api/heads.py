"""The LM head padded for speed at inference: the same logits from a wider, aligned GEMM.

nanoGPT pads GPT-2's vocabulary from 50,257 to 50,304 ("nearest multiple of 64 for efficiency").
With 50,257 outputs every row of the (positions, vocab) product starts at an odd float offset;
padded, every row is 256-byte aligned and MKL's sgemm runs the head faster on this CPU (fp32,
1 thread: GPT-2 small's 768 x 50,257 head on 1,335 positions 1.60x, the default model's 128-wide one
on 2,048 positions 1.32x; docs/throughput.md). The padding rows are zero with a -inf bias, so the
padded logits are -inf: they add exactly 0 to a softmax's sum and are never a target; the real
tokens' logits are the same products of the same rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

VOCAB_MULTIPLE = 64
MIN_ROWS = 256  # fewest positions for which a prefill takes the aligned head (below, the GEMM is small)
S, D = TypeVar("S"), TypeVar("D")


def padded_rows(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (vocab, C) with zero rows up to a multiple of VOCAB_MULTIPLE (itself when it is one)."""
    pad = -weight.shape[0] % VOCAB_MULTIPLE
    return torch.cat([weight, weight.new_zeros(pad, weight.shape[1])]) if pad else weight


def aligned_head(head: nn.Linear) -> nn.Linear:
    """`head` padded to a multiple of VOCAB_MULTIPLE outputs (the head itself when it is one already):
    a copy, never trained, the module's own head untouched."""
    vocab, width = head.weight.shape
    pad = -vocab % VOCAB_MULTIPLE
    if pad == 0:
        return head
    like = {"device": head.weight.device, "dtype": head.weight.dtype}
    with torch.no_grad():
        weight = padded_rows(head.weight)
        bias = torch.cat([torch.zeros(vocab, **like) if head.bias is None else head.bias,
                          torch.full((pad,), float("-inf"), **like)])
    out = nn.Linear(width, vocab + pad, device="meta")  # no init: both tensors are set below
    out.weight, out.bias = (nn.Parameter(t, requires_grad=False) for t in (weight, bias))
    return out


_optimizer_steps = 0


def _count_step(*_args) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


def weights_state(tensors) -> tuple:
    """Changes whenever any of `tensors` may have changed: their storage, their version counters
    (bumped by in-place ops), and the number of optimiser steps taken anywhere in the process (fused
    AdamW updates parameters without bumping `Tensor._version`)."""
    tensors = list(tensors)
    return (_optimizer_steps, tuple(t.data_ptr() for t in tensors), sum(t._version for t in tensors))


class DerivedCache(Generic[S, D]):
    """The last value derived from a source (an aligned head from an `nn.Linear`, a decode copy from
    a module), rebuilt when asked for another source object or when `weights_state` of the source's
    tensors says they may have changed. Holds the source weakly."""

    def __init__(self, build: Callable[[S], D], tensors: Callable[[S], Iterable[torch.Tensor]]) -> None:
        self._build, self._tensors = build, tensors
        self._source: weakref.ref | None = None
        self._state: tuple | None = None
        self._value: D | None = None

    def get(self, source: S) -> D:
        state = weights_state(self._tensors(source))
        if self._source is None or self._source() is not source or self._state != state:
            self._source, self._state, self._value = weakref.ref(source), state, self._build(source)
        return self._value


def aligned_head_cache() -> DerivedCache[nn.Linear, nn.Linear]:
    """`aligned_head` of the last head asked for, kept until its weight or bias may have changed."""
    return DerivedCache(aligned_head, lambda head: [p for p in (head.weight, head.bias) if p is not None])
