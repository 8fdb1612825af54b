"""The report's section for `harness train` rows (task `train`): the runs table, loss curves and the
scratch/reference training-parity table. A plugin: the registry loads it, the report never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from harness.api import REPORT_SECTIONS
from harness.train.config import show

TASK = "train"


@REPORT_SECTIONS.register(TASK, "harness train: runs, loss curves, training parity")
def train_report_section(df: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
    """Markdown for `harness report`: loss curves (PNG), one line per training run, scratch-vs-HF deltas."""
    rows = df[df["task"] == TASK] if "task" in df else df
    if rows.empty:
        return ""
    runs = _runs_table(rows)
    path = _plot_curves(rows, Path(fig_dir))
    lines = ["### Training runs", "", runs, "", f"![training curves]({_rel(path, Path(report_dir))})", ""]
    parity = _training_parity(rows)
    if parity:
        lines += ["### Training parity (scratch vs reference, same init, same batches)", "", parity, ""]
    return "\n".join(lines)


def _train_id(rows: pd.DataFrame) -> pd.Series:
    return rows["extra"].map(lambda e: e.get("train_id", "") if isinstance(e, dict) else "")


def _step(rows: pd.DataFrame) -> pd.Series:
    return rows["extra"].map(lambda e: int(e.get("step", 0)) if isinstance(e, dict) else 0)


def _runs_table(rows: pd.DataFrame) -> str:
    lines = [
        "| model | init | data | steps | final val loss | val perplexity | tokens/s | recipe |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, run in rows.assign(train_id=_train_id(rows)).groupby("train_id", sort=True):
        last = run.iloc[-1]
        value = _last_value_getter(run)
        t = last["config"].get("train", {}) if isinstance(last["config"], dict) else {}
        recipe = ", ".join(
            f"{k}={show(tuple(v) if isinstance(v, list) else v)}"
            for k, v in t.items()
            if k
            in (
                "steps",
                "batch_size",
                "block_size",
                "grad_accum",
                "lr",
                "min_lr",
                "warmup_steps",
                "weight_decay",
                "dropout",
            )
        )
        lines.append(
            f"| {last['model']} | `{last['weights']}` | {last['config'].get('data', '')} | "
            f"{_step(run).max()} | {value('val_loss'):.4f} | {value('val_perplexity'):.2f} | "
            f"{value('tokens_per_second'):.0f} | {recipe} |"
        )
    return "\n".join(lines)


def _last_value_getter(run: pd.DataFrame) -> Callable[[str], float]:
    def value(metric: str) -> float:
        values = run[run["metric"] == metric]["value"]
        return float(values.iloc[-1]) if len(values) else float("nan")

    return value


def _plot_curves(rows: pd.DataFrame, fig_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows.assign(train_id=_train_id(rows), step=_step(rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), squeeze=False)
    for ax, metric in zip(axes[0], ("train_loss", "val_loss")):
        for train_id, run in rows[rows["metric"] == metric].groupby("train_id", sort=True):
            run = run.sort_values("step")
            style = "-" if "scratch" in run["model"].iloc[0] else "--"
            label = f"{run['model'].iloc[0]} on {run['subtask'].iloc[0]} ({train_id[-6:]})"
            ax.plot(run["step"], run["value"], style, label=label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / "train_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _training_parity(rows: pd.DataFrame) -> str:
    """max |train_loss difference| over shared steps for scratch/HF runs with the same init and recipe."""
    losses = rows[rows["metric"] == "train_loss"].assign(step=_step(rows), train_id=_train_id(rows))
    parts = losses["model"].str.rpartition("-")
    losses = losses.assign(
        recipe=losses["config"].map(lambda c: repr(sorted(c.get("train", {}).items()))), arch=parts[0], impl=parts[2]
    )
    lines = []
    for (arch, sha, _), group in losses.groupby(["arch", "weights_sha256", "recipe"], sort=True):
        curves = {impl: g.groupby("step")["value"].last() for impl, g in group.groupby("impl")}
        if "scratch" in curves and "hf" in curves:
            both = curves["scratch"].index.intersection(curves["hf"].index)
            diff = (curves["scratch"][both] - curves["hf"][both]).abs().max() if len(both) else float("nan")
            lines.append(f"| {arch} | `{sha[:12]}` | {len(both)} | {diff:.2e} |")
    head = ["| arch | init sha256 | steps compared | max abs train_loss diff |", "|---|---|---|---|"]
    return "\n".join(head + lines) if lines else ""


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.as_posix()
