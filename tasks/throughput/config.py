"""The throughput task's name, its tokens/s metric names and its config (`--set throughput.KEY=VALUE`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from harness.api import HarnessError

NAME = "throughput"
KINDS = ("prefill", "decode", "train")
TOKENS_PER_S = ("prefill_tokens_per_s", "decode_tokens_per_s", "train_tokens_per_s", "ppl_tokens_per_s",
                "ppl_process_tokens_per_s")


@dataclass(frozen=True)
class ThroughputConfig:
    kinds: tuple[str, ...] = KINDS  # the grid's measurements to time; "none": only the lm-eval comparisons
    batch_sizes: tuple[int, ...] = (1, 4)  # prefill grid: batch sizes
    seq_lens: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)  # prefill grid: lengths (> model max: skipped)
    decode_batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 16  # decode: tokens of the fixed (seeded random) prompt
    new_tokens: int = 32  # decode: greedy tokens generated per call (capped at the model's maximum)
    train_batch_size: int = 4
    train_seq_len: int = 128  # capped at the model's maximum
    warmup: int = 1  # untimed calls per measurement and model; the first one also measures memory
    repeats: int = 5  # timed samples per measurement and model
    min_sample_s: float = 0.05  # a sample repeats the call until it lasts this long (tiny models)
    bounds: bool = True  # prefill: also time its GEMMs and attention alone (rows mfu_bound, mfu_bound_fraction)
    matmul_size: int = 2048  # n of the n x n matmuls that measure the peak FLOP/s
    threads: int = 0  # torch.set_num_threads while the task runs; 0 keeps the current setting
    clock: Literal["wall", "cpu"] = "wall"  # cpu: process CPU seconds (CPU runs on a shared machine, threads=1)
    lm_eval: bool = False  # also time the ppl task against lm-eval's HF backend on the reference
    lm_eval_docs: int = 2  # WikiText-2 test documents for that comparison
    lm_eval_batch_size: int = 4  # windows per forward pass, the same for both sides
    lm_eval_repeats: int = 1  # timed runs of each side, after one warm-up run each
    lm_eval_process: bool = False  # also time `harness run --tasks ppl` against the `lm_eval` CLI as whole processes

    def __post_init__(self) -> None:
        for key in ("batch_sizes", "seq_lens", "decode_batch_sizes"):
            values = getattr(self, key)
            if not values or min(values) < 1:
                raise HarnessError(f"throughput.{key}={','.join(map(str, values))}: give positive integers, e.g. 1,8")
        for key in ("prompt_len", "new_tokens", "train_batch_size", "train_seq_len", "warmup", "repeats",
                    "matmul_size", "lm_eval_docs", "lm_eval_batch_size", "lm_eval_repeats"):
            if getattr(self, key) < 1:
                raise HarnessError(f"throughput.{key}={getattr(self, key)} must be at least 1")
        if self.kinds != ("none",) and (not self.kinds or not set(self.kinds) <= set(KINDS)):
            raise HarnessError(f"throughput.kinds={','.join(self.kinds)}: choose from {','.join(KINDS)} (or none)")
        if self.threads < 0 or self.min_sample_s < 0:
            raise HarnessError("throughput.threads and throughput.min_sample_s must not be negative")
