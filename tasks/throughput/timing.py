"""How calls are timed: interleaved samples on a chosen clock, peak memory growth, and their summaries.

Memory is the peak growth of process RSS (CPU: /proc/self/status VmHWM, reset through
/proc/self/clear_refs) or of torch.cuda.max_memory_allocated (GPU) while building a call and
running it once. `clock=cpu` times process CPU seconds instead of wall seconds.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.api import HarnessError

MB = 2**20


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


def machine() -> dict:
    """The threads and cores a measurement ran with, for the rows' extra."""
    return {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
