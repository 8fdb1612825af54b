"""Task `throughput`: how fast a scratch model runs next to its reference, on identical weights.

Each measurement runs for the model, its reference and a square fp32 matmul in the same process,
interleaved A B M, M B A, ... (a machine that speeds up or slows down mid-run biases no side):
- prefill: a no-grad forward pass that produces logits for every position, over the grid
  `batch_sizes` x `seq_lens` (lengths above the model's maximum are skipped); neither side stores
  keys and values (`CausalLM.forward`);
- decode: greedy generation with the KV cache, `new_tokens` tokens after a fixed `prompt_len`-token
  prompt, at each of `decode_batch_sizes`; tokens/s = batch x new_tokens / time of the whole call
  (the prefill of the short prompt included). Both sides run `CausalLM.generate_batch` (the
  reference: `module.generate` with do_sample=False, eos disabled, use_cache=True);
- train: forward + backward + AdamW step on a copy of the model (the loaded weights never change);
- memory: peak growth of process RSS (CPU) or of CUDA allocations (GPU) while building a call (for
  training: the model copy and AdamW) and running it once (`timing.PeakMemory`);
- `matmul_peak_flops`: the best of the `matmul_size` fp32 matmuls timed between the models, and a
  bf16 matmul where the hardware has native bf16;
- `mfu`: median model FLOP/s over the best fp32 matmul timed beside it, with the per-token FLOPs of
  Kaplan et al. 2020 (see `flops`);
- `mfu_bound` (prefill, `throughput.bounds`): the same FLOPs over the time of the forward's GEMMs and
  attention alone (`calls.kernels_call`, timed beside it): the MFU if nothing else took time, so what
  85% of the peak asks of this machine's kernels; `mfu_bound_fraction` = kernels' time / forward's;
- with `throughput.lm_eval=true`: tokens/s of the `ppl` task against lm-eval's HF backend (`lm_eval_ppl`);
  with `throughput.lm_eval_process=true`: the same as two whole processes, `harness run` against the
  `lm_eval` CLI, start-up and loading included (`ppl_process`).
Values are medians of `repeats` samples taken after `warmup` calls; extra holds q1/q3/min/max and
the samples. `clock=cpu` times process CPU seconds instead of wall seconds: on a CPU shared with
other jobs, with threads=1, that is the time the work took, not the time spent waiting for a core.
A scratch model gets a `<metric>_ratio` row (scratch / reference: the median of the ratios of
back-to-back samples) beside each tokens/s and memory row. A reference model gets the rows that
were measured beside its scratch model earlier in the run, or is measured on its own.
Speed depends on the machine: nothing here checks correctness (see docs/throughput.md).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from harness.api import TASKS, Capability, CausalLM, HarnessError, Metric, MetricSpec, ModelAdapter, RunContext, Task
from tasks.throughput.calls import Measurement, kernels_call, plan, weight_bytes, weights_read_call
from tasks.throughput.config import NAME, TOKENS_PER_S, ThroughputConfig
from tasks.throughput.flops import bf16_supported, matmul_call, matmul_flops
from tasks.throughput.lm_eval_ppl import has_lm_eval, ppl_vs_lm_eval
from tasks.throughput.ppl_process import ppl_processes_vs_lm_eval
from tasks.throughput.report import throughput_section
from tasks.throughput.timing import Samples, Timer, machine, summary

MATMUL = "matmul fp32"  # the peak benchmark's name among the timed calls
WEIGHTS_READ = "weights read"  # batch-1 decode's roofline call (`calls.weights_read_call`)
KERNELS = "gemms + attention"  # a prefill's matmuls and SDPA alone (`calls.kernels_call`): the MFU ceiling

SPEED = MetricSpec(higher_is_better=True, pair_rtol=math.inf, gate_rtol=math.inf)  # machine-bound: never gated
RATIO = MetricSpec(higher_is_better=True, pair_rtol=math.inf, gate_rtol=0.25)
MEMORY = MetricSpec(higher_is_better=False, pair_rtol=math.inf, gate_rtol=0.25)


class Throughput(Task):
    name = NAME
    version = "1.0"
    description = ("tokens/s (prefill grid, KV-cache decode, training), peak memory and MFU of a scratch model "
                   "and its reference on identical weights, measured interleaved; ratios scratch / reference")
    config_class = ThroughputConfig
    needs = frozenset({Capability.CAUSAL_LM})
    measures_reference = True  # the reference's rows are measured in the scratch model's unit (--resume redoes both)
    metrics = {
        **{m: SPEED for m in TOKENS_PER_S}, **{f"{m}_ratio": RATIO for m in TOKENS_PER_S},
        "mfu": SPEED, "matmul_peak_flops": SPEED, "decode_roofline": SPEED,
        "decode_roofline_fraction": SPEED, "memory_bandwidth_bytes_per_s": SPEED,
        "peak_memory_mb": MEMORY, "peak_memory_mb_ratio": MEMORY,
        "mfu_bound": SPEED, "mfu_bound_fraction": SPEED,
    }

    def __init__(self, config: ThroughputConfig) -> None:
        super().__init__(config)
        self._for_reference: dict[tuple[str, str], list[Metric]] = {}  # rows measured beside a scratch model

    def check(self, model: ModelAdapter) -> None:
        super().check(model)  # needs CAUSAL_LM: a decoder-only LM whose calls can be timed
        if self.config.clock == "cpu" and model.device.type != "cpu":
            raise HarnessError(f"throughput.clock=cpu times CPU work; on {model.device.type} use throughput.clock=wall")
        for key in ("lm_eval", "lm_eval_process"):
            if getattr(self.config, key) and model.info.reference is not None and not has_lm_eval():
                raise HarnessError(f"throughput.{key}=true needs lm-eval (pip install lm-eval)")

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        previous = torch.get_num_threads()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        try:
            yield from self._run(model, ctx)
        finally:
            torch.set_num_threads(previous)

    def _run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        model.require(CausalLM, task=self.name)
        reference = ctx.reference(model)  # None for a reference model
        if reference is not None:
            reference.require(CausalLM, task=self.name)
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
            yield from self.roofline_rows(m, model, samples)
            yield from self.bound_rows(m, model, samples, peak)
            if reference is not None:
                shared += self.rows(m, reference, samples, peak, None, beside=model.name)
                shared += self.roofline_rows(m, reference, samples, beside=model.name, read_from=model)
                shared += self.bound_rows(m, reference, samples, peak, beside=model.name)
        if reference is not None and self.config.lm_eval:  # a scratch model: ppl against lm-eval's HF backend
            ours, theirs = ppl_vs_lm_eval(self, model, reference, ctx.seed)
            yield from ours
            shared += theirs
        if reference is not None and self.config.lm_eval_process:  # the same, as two whole processes
            ours, theirs = ppl_processes_vs_lm_eval(self, model, reference, ctx.seed)
            yield from ours
            shared += theirs
        peaks = list(self.peak_rows(model.device, peak_samples)) if steps else []  # nothing timed against a peak
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
                              extra={"median_flops": statistics.median(flops), "unit": "FLOP/s", **machine()})

    def measure(self, m: Measurement, contestants: list[ModelAdapter]) -> dict[str, Samples]:
        """Time the models and the fp32 matmul (the peak that MFU is relative to) side by side."""
        cfg, device = self.config, contestants[0].device
        builds = {c.name: partial(m.build, c.require(CausalLM, task=self.name)) for c in contestants}
        builds[MATMUL] = partial(matmul_call, torch.float32, cfg.matmul_size, device)
        if _batch_one_decode(m):
            builds[WEIGHTS_READ] = partial(weights_read_call, contestants[0])
        if m.kind == "prefill" and cfg.bounds:
            builds[KERNELS] = partial(kernels_call, contestants[0].require(CausalLM, task=self.name),
                                      m.extra["batch_size"], m.extra["seq_len"], 0)
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
                 **machine(),
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

    def roofline_rows(self, m: Measurement, model: ModelAdapter, samples: dict[str, Samples],
                      beside: str | None = None, read_from: ModelAdapter | None = None) -> list[Metric]:
        """Batch-1 decode against its memory roofline: one token must read every decode weight once
        (`weight_bytes`), so tokens/s <= bandwidth / bytes, with the bandwidth measured by the
        matrix-vector products of `weights_read_call` timed beside the decode calls, on the weights of
        `read_from` (the scratch model of a pair, whose weights the reference shares; default `model`)."""
        if WEIGHTS_READ not in samples:
            return []
        nbytes = weight_bytes((read_from or model).require(CausalLM, task=self.name))
        read = samples[WEIGHTS_READ].seconds
        roofline = summary([1 / s for s in read])
        decode = summary([m.extra["new_tokens"] / s for s in samples[model.name].seconds])
        fraction = summary([r / s * m.extra["new_tokens"] for s, r in zip(samples[model.name].seconds, read)])
        extra = {"weight_bytes_per_token": nbytes, "measured_beside": beside, **machine()}
        return [
            self.metric("memory_bandwidth_bytes_per_s", nbytes * roofline["median"], subtask=m.subtask,
                        n=len(read), extra={**extra, "unit": "bytes/s", "measured_by": "one matrix-vector "
                                            "product per decode weight, each in its faster layout"}),
            self.metric("decode_roofline", roofline["median"], subtask=m.subtask, n=len(read),
                        extra={**extra, "unit": "tokens/s", "samples_s": read}),
            self.metric("decode_roofline_fraction", fraction["median"], subtask=m.subtask, n=len(read),
                        extra={**extra, "decode_tokens_per_s": decode["median"],
                               **{k: fraction[k] for k in ("q1", "q3", "min", "max")},
                               "unit": "decode tokens/s / roofline tokens/s (the prompt's prefill included)"}),
        ]

    def bound_rows(self, m: Measurement, model: ModelAdapter, samples: dict[str, Samples], peak: list[float],
                   beside: str | None = None) -> list[Metric]:
        """Prefill against what its GEMMs and attention allow (`calls.kernels_call`, timed beside it on
        the scratch model's weights, which a reference shares): `mfu_bound`, the MFU a forward would
        reach if everything else took no time; `mfu_bound_fraction`, the kernels' time over the
        forward's per back-to-back sample (= mfu / mfu_bound, free of the peak's noise)."""
        if KERNELS not in samples:
            return []
        kernels, ours = samples[KERNELS].seconds, samples[model.name].seconds
        flops = m.flops_per_token(model)
        bound = summary([m.tokens / s * flops / max(peak) for s in kernels])
        fraction = summary([k / s for k, s in zip(kernels, ours)])
        extra = {"flops_per_token": flops, "fp32_peak_flops": max(peak), "measured_beside": beside,
                 "measured_by": "every matmul weight (head padded to 64) and n_layer causal SDPA calls, alone",
                 "samples_s": kernels, **machine()}
        return [
            self.metric("mfu_bound", bound["median"], subtask=m.subtask, n=len(kernels),
                        extra={**extra, "unit": "fraction of fp32 peak", **{k: bound[k] for k in ("q1", "q3")}}),
            self.metric("mfu_bound_fraction", fraction["median"], subtask=m.subtask, n=len(kernels),
                        extra={**extra, "unit": "GEMM + attention seconds / forward seconds",
                               **{k: fraction[k] for k in ("q1", "q3", "min", "max")}}),
        ]

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

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        return throughput_section(history, Path(fig_dir), Path(report_dir))


def _batch_one_decode(m: Measurement) -> bool:
    return m.kind == "decode" and m.extra["batch_size"] == 1


TASKS.add(Throughput.name, Throughput.description, Throughput)
