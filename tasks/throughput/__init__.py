"""Task `throughput` (see `tasks.throughput.task`): importing this package registers it with TASKS.

    config.py       the task's name, metric names and ThroughputConfig
    timing.py       interleaved timing on a wall or CPU clock, peak memory, summaries
    flops.py        peak matmul FLOP/s and a model's FLOPs per token (Kaplan et al. 2020)
    calls.py        what is timed: prefill, decode and training calls of a CausalLM, and the grid
    lm_eval_ppl.py  the ppl task's tokens/s against lm-eval's HF backend
    report.py       the report section: ratio, MFU and target tables and the prefill plot
    task.py         the Throughput task
"""

from tasks.throughput.config import ThroughputConfig
from tasks.throughput.task import Throughput

__all__ = ["Throughput", "ThroughputConfig"]
