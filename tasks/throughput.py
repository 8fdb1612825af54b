"""Task `throughput`: how fast a scratch model runs next to its reference, on identical weights.

Each measurement runs for the model, its reference and a square fp32 matmul in the same process,
interleaved A B M, M B A, ... (a machine that speeds up or slows down mid-run biases no side):
- prefill: a no-grad forward pass that produces logits for every position, over the grid
  `batch_sizes` x `seq_lens` (lengths above the model's maximum are skipped); the reference is
  called with `use_cache=False`, so neither side stores keys and values;
- decode: greedy generation with the KV cache, `new_tokens` tokens after a fixed `prompt_len`-token
  prompt, at each of `decode_batch_sizes`; tokens/s = batch x new_tokens / time of the whole call
  (the prefill of the short prompt included). The reference runs `module.generate` (do_sample=False,
  eos disabled, use_cache=True), the scratch model its own `generate`;
- train: forward + backward + AdamW step on a copy of the model (the loaded weights never change);
- memory: peak growth of process RSS (CPU: /proc/self/status VmHWM, reset through
  /proc/self/clear_refs) or of torch.cuda.max_memory_allocated (GPU) while building a call (for
  training: the model copy and AdamW) and running it once;
- `matmul_peak_flops`: the best of the `matmul_size` fp32 matmuls timed between the models, and a
  bf16 matmul where the hardware has native bf16;
- `mfu`: median model FLOP/s over the best fp32 matmul timed beside it, with the per-token FLOPs of
  Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", Table 1): forward 2N + 2 n_layer
  T d_model, training 3x forward (their C = 6N rule). The attention term is the causal one: a token
  attends to T/2 keys on average, through two matmuls; PaLM (Chowdhery et al. 2022, Appendix B)
  writes 12 n_layer d T for training because it counts non-causal attention. N counts the weights
  used in matmuls: every parameter except the embedding tables, plus the (tied) unembedding;
- with `throughput.lm_eval=true`: tokens/s of the `ppl` task on the scratch model against lm-eval's
  own HF backend (`lm_eval.simple_evaluate` + `HFLM`) on the reference module, on the first
  `lm_eval_docs` WikiText-2 test documents with the same batch size.
Values are medians of `repeats` samples taken after `warmup` calls; extra holds q1/q3/min/max and
the samples. `clock=cpu` times process CPU seconds instead of wall seconds: on a CPU shared with
other jobs, with threads=1, that is the time the work took, not the time spent waiting for a core.
A scratch model gets a `<metric>_ratio` row (scratch / reference: the median of the ratios of
back-to-back samples) beside each tokens/s and memory row. A reference model gets the rows that
were measured beside its scratch model earlier in the run, or is measured on its own.
Speed depends on the machine: nothing here checks correctness (see docs/throughput.md).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from harness.adapter import Capability, ModelAdapter
from harness.errors import HarnessError
from harness.models.causal import HFCausalLM, ScratchCausalLM
from harness.registry import TASKS
from harness.results import Metric
from tasks.base import MetricSpec, RunContext, Task

MB = 2**20
MATMUL = "matmul fp32"  # the peak benchmark's name among the timed calls
TOKENS_PER_S = ("prefill_tokens_per_s", "decode_tokens_per_s", "train_tokens_per_s", "ppl_tokens_per_s")


@dataclass(frozen=True)
class ThroughputConfig:
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
    matmul_size: int = 2048  # n of the n x n matmuls that measure the peak FLOP/s
    threads: int = 0  # torch.set_num_threads while the task runs; 0 keeps the current setting
    clock: Literal["wall", "cpu"] = "wall"  # cpu: process CPU seconds (CPU runs on a shared machine, threads=1)
    lm_eval: bool = False  # also time the ppl task against lm-eval's HF backend on the reference
    lm_eval_docs: int = 2  # WikiText-2 test documents for that comparison
    lm_eval_batch_size: int = 4  # windows per forward pass, the same for both sides
    lm_eval_repeats: int = 1  # timed runs of each side, after one warm-up run each

    def __post_init__(self) -> None:
        for key in ("batch_sizes", "seq_lens", "decode_batch_sizes"):
            values = getattr(self, key)
            if not values or min(values) < 1:
                raise HarnessError(f"throughput.{key}={','.join(map(str, values))}: give positive integers, e.g. 1,8")
        for key in ("prompt_len", "new_tokens", "train_batch_size", "train_seq_len", "warmup", "repeats",
                    "matmul_size", "lm_eval_docs", "lm_eval_batch_size", "lm_eval_repeats"):
            if getattr(self, key) < 1:
                raise HarnessError(f"throughput.{key}={getattr(self, key)} must be at least 1")
        if self.threads < 0 or self.min_sample_s < 0:
            raise HarnessError("throughput.threads and throughput.min_sample_s must not be negative")


# -- timing and memory ------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory growth inside a `with` block, in MB: process RSS on CPU, tensors on CUDA.
    `growth_mb` is nan where neither can be read (no /proc)."""

    STATUS = Path("/proc/self/status")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.growth_mb = math.nan

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.STATUS.exists():
            _trim_heap()  # freed heap memory back to the OS, so RSS starts from what is in use
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
            self.base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.growth_mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / MB
        elif self.STATUS.exists():
            self.growth_mb = max(0, _status_kb("VmHWM") * 1024 - self.base) / MB


def _status_kb(field: str) -> int:
    for line in PeakMemory.STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise HarnessError(f"/proc/self/status has no {field} line")


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS growth may then undercount reused memory
        pass


@dataclass
class Samples:
    seconds: list[float]  # per call, one entry per timed sample
    memory_mb: float  # peak growth while building the call and running it once
    calls_per_sample: int


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    "cpu": time.process_time,  # CPU seconds of this process: what preemption by other jobs does not inflate
}


@dataclass(frozen=True)
class Timer:
    """How samples are taken: the device to synchronise, the clock, warm-up calls, samples per call."""

    device: torch.device
    clock: str = "wall"  # a key of CLOCKS
    warmup: int = 1  # untimed calls; the first one also measures memory
    repeats: int = 5  # timed samples
    min_sample_s: float = 0.05  # a sample repeats the call until it lasts this long

    def seconds(self, fn: Callable[[], object], n: int = 1) -> float:
        """Seconds of n back-to-back calls, with the device synchronised on both ends."""
        clock = CLOCKS[self.clock]
        _sync(self.device)
        start = clock()
        for _ in range(n):
            fn()
        _sync(self.device)
        return clock() - start

    def warm_up(self, build: Callable[[], Callable[[], object]]):
        """Build the call and run it `warmup` times: (call, memory growth of build + first call in
        MB, seconds of the last call)."""
        with PeakMemory(self.device) as memory:
            fn = build()
            seconds = self.seconds(fn)
        for _ in range(self.warmup - 1):
            seconds = self.seconds(fn)
        return fn, memory.growth_mb, seconds

    def interleaved(self, builds: dict[str, Callable[[], Callable[[], object]]]) -> dict[str, Samples]:
        """Time each named call `repeats` times, alternating A B B A ... so that drift cancels."""
        warm = {name: self.warm_up(build) for name, build in builds.items()}
        n = {name: max(1, math.ceil(self.min_sample_s / max(last, 1e-9))) for name, (_, _, last) in warm.items()}
        seconds: dict[str, list[float]] = {name: [] for name in builds}
        for r in range(self.repeats):
            for name in list(builds) if r % 2 == 0 else list(reversed(builds)):
                seconds[name].append(self.seconds(warm[name][0], n[name]) / n[name])
        return {name: Samples(seconds[name], warm[name][1], n[name]) for name in builds}


def summary(values: list[float]) -> dict[str, float]:
    """median, quartiles and range of a list of samples."""
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0], "min": values[0], "max": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


# -- peak FLOP/s and the model's FLOPs ---------------------------------------------------------------


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # native bf16 (AVX512-BF16 / AMX)
    except (AttributeError, RuntimeError):
        return False


def matmul_call(dtype: torch.dtype, n: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """One n x n @ n x n matmul (2 n^3 FLOPs) per call."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device).to(dtype) for _ in range(2))
    return lambda: torch.mm(a, b)


def matmul_flops(dtype: torch.dtype, n: int, timer: Timer) -> list[float]:
    """FLOP/s of each sample of the square matmul."""
    samples = timer.interleaved({"mm": partial(matmul_call, dtype, n, timer.device)})["mm"]
    return [2 * n**3 / s for s in samples.seconds]


def matmul_params(module: nn.Module, vocab_size: int, d_model: int) -> int:
    """Weights used in matmuls: all parameters but embedding tables, plus the unembedding
    (d_model x vocab) where it is tied to the token embedding or is not a parameter of its own."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    n = sum(p.numel() for p in module.parameters() if id(p) not in embeddings)
    own_head = any(isinstance(m, nn.Linear) and m.weight.shape == (vocab_size, d_model)
                   and id(m.weight) not in embeddings for m in module.modules())
    return n if own_head else n + vocab_size * d_model


def forward_flops_per_token(n_params: int, n_layer: int, d_model: int, context: int) -> float:
    """Kaplan et al. 2020, Table 1: 2N + 2 n_layer n_ctx d_attn (causal attention, d_attn = d_model)."""
    return 2 * n_params + 2 * n_layer * context * d_model


def model_flops_per_token(model: ModelAdapter, context: int) -> float:
    cfg = model.weights.hf_config
    n = matmul_params(model.module, cfg.vocab_size, cfg.hidden_size)
    return forward_flops_per_token(n, cfg.num_hidden_layers, cfg.hidden_size, context)


# -- what is timed -----------------------------------------------------------------------------------


def random_tokens(model: ModelAdapter, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.tokenizer.vocab_size, (batch, length), generator=g).to(model.device)


def forward_logits(model: ModelAdapter, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits for every position and no KV cache kept: the same work on both sides."""
    if model.info.impl == "hf":
        return module(input_ids=x, use_cache=False).logits
    return module(x)


def greedy_generate(model: ModelAdapter, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(B, T) -> (B, T + new_tokens), greedy, KV cache on, never stopping early."""
    if model.info.impl == "hf":
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=model.tokenizer.pad_id, use_cache=True)
        with _eos_disabled(model.module):
            out = model.module.generate(idx, generation_config=config, attention_mask=torch.ones_like(idx))
    else:
        out = model.module.generate(idx, new_tokens, temperature=0.0)
    if out.shape[1] != idx.shape[1] + new_tokens:
        raise HarnessError(f"{model.name} generated {out.shape[1] - idx.shape[1]} tokens, not {new_tokens}")
    return out


@contextmanager
def _eos_disabled(module: nn.Module) -> Iterator[None]:
    """transformers fills an `eos_token_id=None` from `module.generation_config`: clear it there too."""
    config = module.generation_config
    eos, config.eos_token_id = config.eos_token_id, None
    try:
        yield
    finally:
        config.eos_token_id = eos


def prefill_call(model: ModelAdapter, batch: int, length: int, seed: int) -> Callable[[], torch.Tensor]:
    x = random_tokens(model, batch, length, seed)
    return torch.no_grad()(lambda: forward_logits(model, model.module, x))


def decode_call(model: ModelAdapter, batch: int, prompt_len: int, new_tokens: int, seed: int):
    x = random_tokens(model, batch, prompt_len, seed)
    return torch.no_grad()(lambda: greedy_generate(model, x, new_tokens))


def train_call(model: ModelAdapter, batch: int, length: int, seed: int) -> Callable[[], None]:
    """One AdamW training step per call, on a private copy of the module."""
    module = copy.deepcopy(model.module).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    x = random_tokens(model, batch, length, seed)

    def step() -> None:
        with torch.enable_grad():
            logits = forward_logits(model, module, x)
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@dataclass(frozen=True)
class Measurement:
    kind: str  # "prefill", "decode" or "train": the metric is `<kind>_tokens_per_s`
    subtask: str  # the grid point, e.g. "prefill b=1 t=128"
    tokens: int  # tokens processed per call
    context: int  # sequence length, for the attention term of the FLOP count
    flop_factor: float | None  # x forward FLOPs per token: 1 (prefill), 3 (train); None: no mfu (decode)
    build: Callable[[ModelAdapter], Callable[[], object]]  # adapter -> the call to time
    extra: dict

    def flops_per_token(self, model: ModelAdapter) -> float | None:
        return None if self.flop_factor is None else self.flop_factor * model_flops_per_token(model, self.context)


def plan(cfg: ThroughputConfig, models: list[ModelAdapter], seed: int) -> list[Measurement]:
    """Every grid point that all the models can run."""
    max_len = min(m.max_length for m in models)
    out = prefill_plan(cfg, max_len, seed)
    if all(Capability.GENERATE in m.capabilities for m in models):
        out += decode_plan(cfg, max_len, seed)
    if all(Capability.TRAIN in m.capabilities for m in models):
        out += train_plan(cfg, max_len, seed)
    return out


def prefill_plan(cfg: ThroughputConfig, max_len: int, seed: int) -> list[Measurement]:
    return [Measurement("prefill", f"prefill b={b} t={t}", b * t, t, 1.0,
                        partial(prefill_call, batch=b, length=t, seed=seed), {"batch_size": b, "seq_len": t})
            for b in cfg.batch_sizes for t in cfg.seq_lens if t <= max_len]


def decode_plan(cfg: ThroughputConfig, max_len: int, seed: int) -> list[Measurement]:
    prompt = min(cfg.prompt_len, max_len - 1)
    new = min(cfg.new_tokens, max_len - prompt)
    return [Measurement("decode", f"decode b={b} prompt={prompt} new={new}", b * new, prompt + new, None,
                        partial(decode_call, batch=b, prompt_len=prompt, new_tokens=new, seed=seed),
                        {"batch_size": b, "prompt_len": prompt, "new_tokens": new})
            for b in cfg.decode_batch_sizes]


def train_plan(cfg: ThroughputConfig, max_len: int, seed: int) -> list[Measurement]:
    b, t = cfg.train_batch_size, min(cfg.train_seq_len, max_len)
    return [Measurement("train", f"train b={b} t={t}", b * t, t, 3.0,
                        partial(train_call, batch=b, length=t, seed=seed), {"batch_size": b, "seq_len": t})]


# -- the task ----------------------------------------------------------------------------------------

SPEED = MetricSpec(higher_is_better=True, pair_rtol=math.inf, gate_rtol=math.inf)  # machine-bound: never gated
RATIO = MetricSpec(higher_is_better=True, pair_rtol=math.inf, gate_rtol=0.25)
MEMORY = MetricSpec(higher_is_better=False, pair_rtol=math.inf, gate_rtol=0.25)


class Throughput(Task):
    name = "throughput"
    version = "1.0"
    description = ("tokens/s (prefill grid, KV-cache decode, training), peak memory and MFU of a scratch model "
                   "and its reference on identical weights, measured interleaved; ratios scratch / reference")
    config_class = ThroughputConfig
    needs = frozenset({Capability.LOGITS})
    metrics = {
        **{m: SPEED for m in TOKENS_PER_S}, **{f"{m}_ratio": RATIO for m in TOKENS_PER_S},
        "mfu": SPEED, "matmul_peak_flops": SPEED, "peak_memory_mb": MEMORY, "peak_memory_mb_ratio": MEMORY,
    }

    def __init__(self, config: ThroughputConfig) -> None:
        super().__init__(config)
        self._for_reference: dict[tuple[str, str], list[Metric]] = {}  # rows measured beside a scratch model

    def check(self, model: ModelAdapter) -> None:
        super().check(model)
        if not isinstance(model, (ScratchCausalLM, HFCausalLM)):
            raise HarnessError(f"throughput measures decoder-only LMs; '{model.name}' is not one")
        if self.config.clock == "cpu" and model.device.type != "cpu":
            raise HarnessError(f"throughput.clock=cpu times CPU work; on {model.device.type} use throughput.clock=wall")
        if self.config.lm_eval and model.info.impl == "scratch" and not _has_lm_eval():
            raise HarnessError("throughput.lm_eval=true needs lm-eval (pip install lm-eval)")

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        previous = torch.get_num_threads()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        try:
            yield from self._run(model, ctx)
        finally:
            torch.set_num_threads(previous)

    def _run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        reference = ctx.reference(model)
        cached = self._for_reference.pop((model.name, model.weights.sha256), None)
        if reference is None and cached is not None:
            yield from cached
            return
        shared: list[Metric] = []  # the reference's rows, handed out when the runner gets to it
        contestants = [model] + ([reference] if reference is not None else [])
        steps = plan(self.config, contestants, ctx.seed)
        peak_samples: list[float] = []  # fp32 FLOP/s of every matmul timed between the models
        for m in ctx.track(steps, total=len(steps), description=f"throughput {model.name}"):
            samples = self.measure(m, contestants)
            peak = [2 * self.config.matmul_size**3 / s for s in samples[MATMUL].seconds]
            peak_samples += peak
            yield from self.rows(m, model, samples, peak, reference)
            if reference is not None:
                shared += self.rows(m, reference, samples, peak, None, beside=model.name)
        if reference is not None and self.config.lm_eval and model.info.impl == "scratch":
            ours, theirs = self.ppl_vs_lm_eval(model, reference, ctx.seed)
            yield from ours
            shared += theirs
        peaks = list(self.peak_rows(model.device, peak_samples))
        yield from peaks
        if reference is not None:
            self._for_reference[(reference.name, reference.weights.sha256)] = shared + peaks

    def peak_rows(self, device: torch.device, fp32_samples: list[float]) -> Iterator[Metric]:
        """The best fp32 matmul FLOP/s of the run (timed between the models) and, where the hardware
        has native bf16, a bf16 matmul measured now."""
        n, timer = self.config.matmul_size, replace(self.timer(device), warmup=1, min_sample_s=0.2)
        samples = {"fp32": fp32_samples or matmul_flops(torch.float32, n, timer)}
        if bf16_supported(device):
            samples["bf16"] = matmul_flops(torch.bfloat16, n, timer)
        for name, flops in samples.items():
            yield self.metric("matmul_peak_flops", max(flops), subtask=f"matmul {name} n={n}", n=len(flops),
                              extra={"median_flops": statistics.median(flops), "unit": "FLOP/s", **_machine()})

    def measure(self, m: Measurement, contestants: list[ModelAdapter]) -> dict[str, Samples]:
        """Time the models and the fp32 matmul (the peak that MFU is relative to) side by side."""
        cfg, device = self.config, contestants[0].device
        builds = {c.name: partial(m.build, c) for c in contestants}
        builds[MATMUL] = partial(matmul_call, torch.float32, cfg.matmul_size, device)
        return self.timer(device).interleaved(builds)

    def timer(self, device: torch.device) -> Timer:
        cfg = self.config
        return Timer(device, cfg.clock, cfg.warmup, cfg.repeats, cfg.min_sample_s)

    def rows(self, m: Measurement, model: ModelAdapter, samples: dict[str, Samples], peak: list[float],
             reference: ModelAdapter | None, beside: str | None = None) -> list[Metric]:
        """Rows of one model for one measurement: tokens/s, mfu, memory, and ratios against the reference."""
        ours = samples[model.name]
        tps = summary([m.tokens / s for s in ours.seconds])
        ratio = summary([r / s for s, r in zip(ours.seconds, samples[reference.name].seconds)]) if reference else None
        extra = {**m.extra, **{k: tps[k] for k in ("q1", "q3", "min", "max")}, "unit": "tokens/s",
                 "samples_s": ours.seconds, "tokens_per_call": m.tokens, "calls_per_sample": ours.calls_per_sample,
                 **_machine(),
                 "ratio_vs_reference": ratio["median"] if ratio else None, "measured_beside": beside}
        out = [self.metric(f"{m.kind}_tokens_per_s", tps["median"], subtask=m.subtask, n=len(ours.seconds),
                           extra=extra)]
        if ratio:
            out.append(self.ratio_row(f"{m.kind}_tokens_per_s_ratio", m.subtask, ratio, reference, tps["median"],
                                      summary([m.tokens / s for s in samples[reference.name].seconds])["median"]))
        flops = m.flops_per_token(model)
        if flops is not None:
            out.append(self.mfu_row(m, flops, ours, peak, extra))
        return out + self.memory_rows(m, ours, samples[reference.name] if reference else None, reference, beside)

    def mfu_row(self, m: Measurement, flops: float, ours: Samples, peak: list[float], extra: dict) -> Metric:
        """Median model FLOP/s over the best fp32 matmul timed between the models' samples: being
        preempted only ever slows a sample down, so the best is the closest to the machine's peak."""
        mfu = summary([m.tokens / s * flops / max(peak) for s in ours.seconds])
        return self.metric("mfu", mfu["median"], subtask=m.subtask, n=len(ours.seconds), extra={
            "flops_per_token": flops, "fp32_peak_flops": max(peak), "fp32_median_flops": statistics.median(peak),
            "unit": "fraction of fp32 peak", **{k: mfu[k] for k in ("q1", "q3", "min", "max")},
            **{k: extra[k] for k in ("ratio_vs_reference", "measured_beside")}})

    def ratio_row(self, metric: str, subtask: str, ratio: dict, reference: ModelAdapter, ours: float,
                  theirs: float) -> Metric:
        extra = {"reference": reference.name, "value": ours, "reference_value": theirs,
                 "ratio_of_medians": ours / theirs, **{k: ratio[k] for k in ("q1", "q3", "min", "max")}}
        return self.metric(metric, ratio["median"], subtask=subtask, n=None, extra=extra)

    def memory_rows(self, m: Measurement, ours: Samples, theirs: Samples | None, reference: ModelAdapter | None,
                    beside: str | None) -> list[Metric]:
        if math.isnan(ours.memory_mb):
            return []
        ratio = ours.memory_mb / theirs.memory_mb if theirs is not None and theirs.memory_mb > 0 else None
        what = "build + first call: model copy, AdamW state, activations" if m.kind == "train" else "first call"
        out = [self.metric("peak_memory_mb", ours.memory_mb, subtask=m.subtask, extra={
            "unit": "MB", "measures": what, "ratio_vs_reference": ratio, "measured_beside": beside})]
        if ratio is not None:
            out.append(self.metric("peak_memory_mb_ratio", ratio, subtask=m.subtask, extra={
                "reference": reference.name, "value": ours.memory_mb, "reference_value": theirs.memory_mb}))
        return out

    # -- ppl: this harness against lm-eval's HF backend ---------------------------------------------

    def ppl_vs_lm_eval(self, model: ModelAdapter, reference: ModelAdapter, seed: int):
        """(rows for the scratch model, rows for the reference): ppl tokens/s, ours vs lm-eval's."""
        cfg = self.config
        with tempfile.TemporaryDirectory() as tmp:
            ours_call, theirs_call, outputs, tokens = _ppl_calls(model, reference, cfg, seed, Path(tmp))
            timer = replace(self.timer(model.device), warmup=1, repeats=cfg.lm_eval_repeats, min_sample_s=0.0)
            samples = timer.interleaved({"ours": lambda: ours_call, "lm_eval": lambda: theirs_call})
        subtask = f"ppl wikitext-2 test docs={cfg.lm_eval_docs} b={cfg.lm_eval_batch_size}"
        ours, theirs = (summary([tokens / s for s in samples[k].seconds]) for k in ("ours", "lm_eval"))
        ratio = summary([t / o for o, t in zip(samples["ours"].seconds, samples["lm_eval"].seconds)])
        check = {"tokens": tokens, "word_perplexity_ours": outputs["ours"],
                 "word_perplexity_lm_eval": outputs["lm_eval"]}
        mine = [self.metric("ppl_tokens_per_s", ours["median"], subtask=subtask, extra={
                    **check, "scorer": "harness ppl task", "ratio_vs_reference": ratio["median"], **_machine()}),
                self.ratio_row("ppl_tokens_per_s_ratio", subtask, ratio, reference, ours["median"], theirs["median"])]
        rows_theirs = [self.metric("ppl_tokens_per_s", theirs["median"], subtask=subtask, extra={
            **check, "scorer": "lm_eval.simple_evaluate + HFLM", "measured_beside": model.name, **_machine()})]
        return mine, rows_theirs

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        return throughput_section(history, Path(fig_dir), Path(report_dir))


def _machine() -> dict:
    return {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def _has_lm_eval() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _ppl_calls(model: ModelAdapter, reference: ModelAdapter, cfg: ThroughputConfig, seed: int, tmp: Path):
    """The two timed calls (our ppl task on `model`, lm-eval on `reference`), where each stores its
    word perplexity in `outputs`, and the number of tokens both score."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerFast

    from tasks.ppl import Perplexity, PplConfig, detokenize, load_wikitext_documents

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the documents are a local file: never ask the hub
    docs = load_wikitext_documents("test")[: cfg.lm_eval_docs]
    task_manager = TaskManager(include_path=str(_write_lm_eval_task(docs, tmp)))
    eot = reference.tokenizer.decode([reference.tokenizer.eot_id])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=reference.tokenizer.backend, eos_token=eot, bos_token=eot)
    lm = HFLM(pretrained=reference.module, tokenizer=tokenizer, batch_size=cfg.lm_eval_batch_size,
              device=str(reference.device))
    ppl = Perplexity(PplConfig(batch_size=cfg.lm_eval_batch_size))
    ctx = RunContext(seed, cfg.lm_eval_docs, str(model.device), lambda m: None, lambda it, **kw: it)
    outputs: dict[str, float] = {}

    def ours() -> None:
        outputs["ours"] = next(r.value for r in ppl.run(model, ctx) if r.metric == "word_perplexity")

    def theirs() -> None:
        out = lm_eval.simple_evaluate(model=lm, tasks=["wikitext_local"], task_manager=task_manager)
        outputs["lm_eval"] = out["results"]["wikitext_local"]["word_perplexity,none"]

    tokens = sum(len(t) for t in model.tokenizer.encode_batch([detokenize(d) for d in docs]))
    return ours, theirs, outputs, tokens


def _write_lm_eval_task(docs: list[str], tmp: Path) -> Path:
    """lm-eval's own `wikitext` task, reading our vendored documents from a local JSON Lines file."""
    import json

    import lm_eval

    (tmp / "docs.jsonl").write_text("".join(json.dumps({"page": d}) + "\n" for d in docs), encoding="utf-8")
    builtin = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "wikitext.yaml"
    (tmp / "wikitext_local.yaml").write_text(
        f"include: {builtin}\ntask: wikitext_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp / 'docs.jsonl'}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n", encoding="utf-8")
    return tmp


# -- report ------------------------------------------------------------------------------------------


def throughput_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
    """Markdown: a scratch / reference ratio table and a plot of prefill tokens/s against length."""
    from harness.results import latest

    rows = latest(history[history["task"] == Throughput.name]) if "task" in history else history
    if rows.empty:
        return ""
    lines = ["### Throughput: scratch / reference", "", ratio_table(rows), ""]
    if not rows[rows["metric"] == "mfu"].empty:
        lines += ["MFU: model FLOP/s (Kaplan et al. 2020 per-token count) / best fp32 matmul timed beside it.", "",
                  mfu_table(rows), ""]
    peaks = rows[rows["metric"] == "matmul_peak_flops"]
    if not peaks.empty:
        shown = ", ".join(f"{s}: {v / 1e9:.1f} GFLOP/s" for s, v in peaks.groupby("subtask")["value"].max().items())
        lines += [f"Measured matmul peaks (best over models): {shown}.", ""]
    lines += targets_table(rows)
    plot = plot_prefill(rows, fig_dir)
    if plot is not None:
        lines += [f"![prefill tokens/s against sequence length]({os.path.relpath(plot, report_dir)})", ""]
    return "\n".join(lines)


# Issue 6's targets for gpt2-scratch on the 124M config (fp32, CPU): (what, metric, subtask prefix, target).
TARGETS = (
    ("prefill vs gpt2-hf", "prefill_tokens_per_s_ratio", "prefill", 1.1),
    ("prefill MFU (fraction of measured fp32 matmul peak)", "mfu", "prefill", 0.8),
    ("decode with KV cache vs transformers generate, batch 1", "decode_tokens_per_s_ratio", "decode b=1", 1.5),
    ("ppl tokens/s vs lm-eval's HF backend", "ppl_tokens_per_s_ratio", "ppl", 1.5),
)


def targets_table(rows: pd.DataFrame) -> list[str]:
    """Reached vs targeted, from the `random:gpt2` (124M) rows of gpt2-scratch; nothing if there are none."""
    sub = rows[(rows["model"] == "gpt2-scratch") & (rows["weights"] == "random:gpt2")]
    if sub.empty:
        return []
    out = ["Targets (124M config, fp32, CPU; commands in docs/throughput.md):", "",
           "| target | wanted | measured (range over the grid) | reached |", "|---|---|---|---|"]
    for what, metric, prefix, want in TARGETS:
        vals = sub[(sub["metric"] == metric) & sub["subtask"].str.startswith(prefix)]["value"]
        if vals.empty:
            out.append(f"| {what} | >= {want:g} | not measured | - |")
            continue
        reached = "yes" if vals.min() >= want else ("at some grid points" if vals.max() >= want else "no")
        out.append(f"| {what} | >= {want:g} | {vals.min():.2f} - {vals.max():.2f} | {reached} |")
    return [*out, ""]


MEASUREMENTS = {  # ratio metric -> what the table calls it
    **{f"{m}_ratio": m.removesuffix("_per_s").replace("_", " ") + "/s" for m in TOKENS_PER_S},
    "peak_memory_mb_ratio": "peak memory MB (lower is better)",
}


def ratio_table(rows: pd.DataFrame) -> str:
    ratios = rows[rows["metric"].isin(list(MEASUREMENTS))]
    if ratios.empty:
        return "_no scratch/reference pair measured_"
    out = ["| model | reference | weights | subtask | measurement | scratch | reference | ratio (median) | IQR |",
           "|---|---|---|---|---|---|---|---|---|"]
    order = list(MEASUREMENTS)
    key = ratios.apply(lambda r: (r["weights"], r["model"], order.index(r["metric"]), _grid_order(r["subtask"])),
                       axis=1)
    for _, r in ratios.assign(key=key).sort_values("key").iterrows():
        e, iqr = r["extra"], "-"
        if "q1" in e:
            iqr = f"{e['q1']:.2f}-{e['q3']:.2f}"
        out.append(f"| {r['model']} | {e.get('reference', '-')} | `{r['weights']}` | {r['subtask']} | "
                   f"{MEASUREMENTS[r['metric']]} | {_num(e.get('value'))} | {_num(e.get('reference_value'))} | "
                   f"**{r['value']:.2f}x** | {iqr} |")
    return "\n".join(out)


def _grid_order(subtask: str) -> tuple:
    """prefill, decode, train, ppl; then "t=128" before "t=1024" (digit runs compare as numbers)."""
    kinds = ["prefill", "decode", "train", "ppl"]
    kind = subtask.split(" ")[0]
    return (kinds.index(kind) if kind in kinds else len(kinds),
            *(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", subtask)))


def mfu_table(rows: pd.DataFrame) -> str:
    """Model FLOP utilisation per grid point, one column per (model, weights)."""
    mfu = rows[rows["metric"] == "mfu"]
    if mfu.empty:
        return ""
    columns = sorted(set(zip(mfu["model"], mfu["weights"])))
    out = ["| subtask | " + " | ".join(f"{m} (`{w}`)" for m, w in columns) + " |", "|---|" + "---|" * len(columns)]
    for subtask in sorted(mfu["subtask"].unique(), key=_grid_order):
        cells = [mfu[(mfu["subtask"] == subtask) & (mfu["model"] == m) & (mfu["weights"] == w)]["value"]
                 for m, w in columns]
        out.append(f"| {subtask} | " + " | ".join(f"{c.iloc[-1]:.1%}" if len(c) else "-" for c in cells) + " |")
    return "\n".join(out)


def plot_prefill(rows: pd.DataFrame, fig_dir: Path) -> Path | None:
    """Prefill tokens/s against sequence length: one panel per weights, one colour per batch size,
    solid for scratch models and dashed for references."""
    prefill = rows[rows["metric"] == "prefill_tokens_per_s"]
    if prefill.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefill = prefill.assign(b=prefill["extra"].map(lambda e: e["batch_size"]),
                             t=prefill["extra"].map(lambda e: e["seq_len"]))
    weights, colors = sorted(prefill["weights"].unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(weights), figsize=(5 * len(weights), 3.6), squeeze=False)
    for ax, w in zip(axes[0], weights):
        block = prefill[prefill["weights"] == w]
        batches = sorted(block["b"].unique())
        for (model, b), line in block.groupby(["model", "b"], sort=True):
            line = line.sort_values("t")
            scratch = "scratch" in model
            ax.plot(line["t"], line["value"], "-o" if scratch else "--s", color=colors[batches.index(b) % len(colors)],
                    label=f"{model} b={b}")
        ticks = sorted(block["t"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        clock = block["config"].iloc[-1].get("clock", "wall") if isinstance(block["config"].iloc[-1], dict) else "wall"
        ax.set(xlabel="sequence length (tokens)", ylabel=f"prefill tokens/s ({clock} clock)", title=f"weights {w}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / "throughput_prefill.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


TASKS.add(Throughput.name, Throughput.description, Throughput)
