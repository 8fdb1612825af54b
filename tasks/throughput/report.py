"""The throughput section of the report: scratch / reference ratios, MFU, matmul peaks, the 124M
targets, and a plot of prefill tokens/s against sequence length."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd

from tasks.throughput.config import NAME, TOKENS_PER_S


def throughput_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
    """Markdown: a scratch / reference ratio table and a plot of prefill tokens/s against length."""
    from harness.api import latest

    rows = latest(history[history["task"] == NAME]) if "task" in history else history
    if rows.empty:
        return ""
    lines = ["### Throughput: scratch / reference", "", ratio_table(rows), ""]
    if not rows[rows["metric"] == "mfu"].empty:
        lines += ["MFU: model FLOP/s (Kaplan et al. 2020 per-token count) / best fp32 matmul timed beside it; in "
                  "brackets, the same FLOPs over the time of the forward's GEMMs and attention alone (`mfu_bound`): "
                  "the MFU if nothing else took time.", "",
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
    ("ppl as whole processes vs the lm_eval CLI (issue 17)", "ppl_process_tokens_per_s_ratio", "ppl", 2.0),
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
    """Model FLOP utilisation per grid point, one column per (model, weights); where the run timed the
    forward's GEMMs and attention alone, their ceiling (`mfu_bound`) beside it."""
    mfu = rows[rows["metric"] == "mfu"]
    if mfu.empty:
        return ""
    columns = sorted(set(zip(mfu["model"], mfu["weights"])))
    out = ["| subtask | " + " | ".join(f"{m} (`{w}`)" for m, w in columns) + " |", "|---|" + "---|" * len(columns)]
    for subtask in sorted(mfu["subtask"].unique(), key=_grid_order):
        cells = [_mfu_cell(rows, subtask, m, w) for m, w in columns]
        out.append(f"| {subtask} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _mfu_cell(rows: pd.DataFrame, subtask: str, model: str, weights: str) -> str:
    here = rows[(rows["subtask"] == subtask) & (rows["model"] == model) & (rows["weights"] == weights)]
    mfu, bound = (here[here["metric"] == k]["value"] for k in ("mfu", "mfu_bound"))
    if mfu.empty:
        return "-"
    return f"{mfu.iloc[-1]:.1%}" + (f" (GEMMs + attention alone: {bound.iloc[-1]:.1%})" if len(bound) else "")


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
