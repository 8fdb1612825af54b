"""`harness report`: result rows -> one markdown report with tables and plots.

Per task: models side by side (newest row per model/weights/subtask/metric), then every scratch
model next to its reference on the same weights with the delta and whether it is within the
task's tolerance, then a plot. Provenance (versions, git sha, weights) closes the report.
Tasks with their own story to tell (training curves, GLUE tables) add a section through
`Task.report_section`.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from harness.api import (  # noqa: E402
    MODELS,
    REPORT_SECTIONS,
    TASKS,
    MetricSpec,
    allowed_difference,
    latest,
    load_results,
    metric_spec,
    now_iso,
)


def write_report(locations: list[str], out: str) -> Path:
    df = load_results(*locations)
    out_path = Path(out)
    fig_dir = out_path.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        f"# Harness report\n\nGenerated {now_iso()} from {len(df)} result rows in "
        f"{', '.join(f'`{loc}`' for loc in locations)}.\n"
    ]
    if df.empty:
        parts.append("No results yet: run `harness run ...` first.\n")
    else:
        df["variant"] = [_variant(task, cfg) for task, cfg in zip(df["task"], df["config"])]
        newest = latest(df, ("model", "weights", "variant", "task", "subtask", "metric"))
        for task in sorted(newest["task"].unique()):
            parts.append(task_section(task, newest[newest["task"] == task], df[df["task"] == task], fig_dir, out_path))
        parts.append(provenance_section(df))
    out_path.write_text("\n".join(parts), encoding="utf-8")
    return out_path


def _variant(task: str, config) -> str:
    """The task's label for this row's kind of run ("" unless the task tells runs apart)."""
    if task not in TASKS or not isinstance(config, dict):
        return ""
    return TASKS.get(task).variant(config)


def task_section(task: str, newest: pd.DataFrame, history: pd.DataFrame, fig_dir: Path, out_path: Path) -> str:
    cls = TASKS.get(task) if task in TASKS else None
    title = f"## Task `{task}`" + (f" (v{newest['task_version'].iloc[-1]})" if "task_version" in newest else "")
    lines = [title, "", cls.description if cls else "", ""]
    for (weights, variant), block in newest.groupby(["weights", "variant"], sort=True):
        heading = f"### weights `{weights}`" + (f", {variant}" if variant else "")
        lines += [heading, "", side_by_side(block), "", pairs_table(task, block), ""]
        plot = plot_task(task, weights, block, fig_dir, variant)
        if plot is not None:
            lines += [f"![{task} {weights}]({plot.relative_to(out_path.parent).as_posix()})", ""]
    custom = getattr(cls, "report_section", None) or (REPORT_SECTIONS.get(task) if task in REPORT_SECTIONS else None)
    if custom is not None:
        lines.append(custom(history, fig_dir, out_path.parent) or "")
    return "\n".join(lines)


def side_by_side(block: pd.DataFrame) -> str:
    models = sorted(block["model"].unique(), key=_pair_order)
    table = block.pivot_table(index=["subtask", "metric"], columns="model", values="value", aggfunc="last")
    stderr = block.pivot_table(index=["subtask", "metric"], columns="model", values="stderr", aggfunc="last")
    stderr = stderr.reindex(index=table.index, columns=table.columns)  # metrics without any stderr -> NaN
    header = "| subtask | metric | " + " | ".join(models) + " |"
    rows = [header, "|" + "---|" * (len(models) + 2)]
    for (subtask, metric), row in table.iterrows():
        cells = [_cell(row.get(m), stderr.loc[(subtask, metric)].get(m)) for m in models]
        rows.append(f"| {subtask or '-'} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def pairs_table(task: str, block: pd.DataFrame) -> str:
    rows = [
        "| scratch | reference | subtask | metric | scratch value | reference value | delta | tolerance | within |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scratch in sorted(block["model"].unique()):
        reference = _reference_of(scratch)
        if reference is None:
            continue
        ours = block[block["model"] == scratch].set_index(["subtask", "metric"])
        theirs = block[block["model"] == reference].set_index(["subtask", "metric"]) if reference else None
        for key, row in ours.iterrows():
            line = _pair_row(task, scratch, reference, key, row, theirs)
            if line is not None:
                rows.append(line)
    return "\n".join(rows) if len(rows) > 2 else "_no scratch/reference pair on these weights_"


def _pair_row(task, scratch, reference, key, row, theirs) -> str | None:
    subtask, metric = key
    spec = metric_spec(task, metric, row["higher_is_better"])
    if spec.threshold is not None or metric == "greedy_tokens_equal":  # parity: the value is itself a diff
        ok = row["value"] <= spec.threshold if spec.threshold is not None else row["value"] == 1.0
        tol = f"<= {spec.threshold:g}" if spec.threshold is not None else "== 1"
        return (
            f"| {scratch} | {row.get('extra', {}).get('reference', reference)} | {subtask or '-'} | {metric} | "
            f"{_fmt(row['value'])} | - | - | {tol} | {'yes' if ok else '**NO**'} |"
        )
    if theirs is None or key not in theirs.index:
        return None  # the reference was not run on these weights: nothing to compare
    ref = theirs.loc[key]
    delta = row["value"] - ref["value"]
    allowed = _pair_allowed(spec, ref["value"], row.get("stderr"), ref.get("stderr"))
    ok = abs(delta) <= allowed
    return (
        f"| {scratch} | {reference} | {subtask or '-'} | {metric} | {_fmt(row['value'])} | {_fmt(ref['value'])} | "
        f"{delta:+.3g} | {allowed:.3g} | {'yes' if ok else '**NO**'} |"
    )


def _pair_allowed(spec: MetricSpec, ref_value: float, se1, se2) -> float:
    return allowed_difference(spec.pair_atol + spec.pair_rtol * abs(ref_value), se1, se2)


def plot_task(task: str, weights: str, block: pd.DataFrame, fig_dir: Path, variant: str = "") -> Path | None:
    metrics = sorted(block["metric"].unique())
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        sub = block[block["metric"] == metric]
        labels = [f"{m}\n{s}" if s else m for m, s in zip(sub["model"], sub["subtask"])]
        ax.bar(range(len(sub)), sub["value"], color=["#4c72b0" if "scratch" in m else "#dd8452" for m in sub["model"]])
        ax.set_xticks(range(len(sub)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        if sub["value"].gt(0).all() and sub["value"].max() / max(sub["value"].min(), 1e-300) > 100:
            ax.set_yscale("log")
    fig.tight_layout()
    path = fig_dir / (f"{task}_{_slug(weights)}" + (f"_{_slug(variant)}" if variant else "") + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def provenance_section(df: pd.DataFrame) -> str:
    cols = ["run_id", "git_sha", "git_dirty", "harness_version", "torch_version", "transformers_version", "device"]
    runs = df.groupby("run_id", sort=True).last().reset_index()
    lines = ["## Provenance", "", "| " + " | ".join(cols) + " | rows |", "|" + "---|" * (len(cols) + 1)]
    counts = df.groupby("run_id").size()
    for _, r in runs.iterrows():
        cells = [str(r[c])[:12] if c == "git_sha" else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + f" | {counts[r['run_id']]} |")
    lines += ["", "| weights | sha256 (tensors) | models |", "|---|---|---|"]
    for (weights, sha), block in df.groupby(["weights", "weights_sha256"], sort=True):
        lines.append(f"| `{weights}` | `{sha[:16]}` | {', '.join(sorted(block['model'].unique()))} |")
    return "\n".join(lines) + "\n"


def _reference_of(model: str) -> str | None:
    return MODELS.get(model).info.reference if model in MODELS else None


def _pair_order(model: str) -> tuple[str, int]:
    arch, _, impl = model.rpartition("-")
    return (arch or impl, 0 if impl == "scratch" else 1)


def _cell(value, stderr) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if stderr is not None and not (isinstance(stderr, float) and math.isnan(stderr)):
        return f"{_fmt(value)} ± {_fmt(stderr)}"
    return _fmt(value)


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.4f}"
    return f"{value:.3e}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")[:60]
