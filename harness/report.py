"""`harness report`: result rows -> one markdown report that leads with its verdict.

1. A scorecard: one row per scratch/reference pair, task and weights: the task's headline metric on each
   side, n, the run's `--limit`, and a verdict over every quality metric of the pair (agrees; diverges, by
   how much; not run), linking to the task's section.
2. One section per task: per weights (and kind of run) one table, the models side by side with n, the
   limit, the tolerance and the verdict per metric, timings in a table of their own; then one plot with
   the tolerance drawn (parity's threshold line, the reference's allowed band on each scratch bar).
   Tasks with their own story to tell (training curves, GLUE tables) add a section (`Task.report_section`).
3. Provenance (versions, git sha, weights).

Verdicts (harness/api/verdicts.py) use the one tolerance rule (harness/api/tolerance.py) with each
metric's `MetricSpec`: a metric with a `threshold` is a difference already (parity) and must stay under
it; a `*_equal` metric must be 1; any other metric agrees when |scratch - reference| <= pair_atol +
pair_rtol x |reference| (or the 95% noise band of the two stderrs). Two rows are compared only when
their plans match (task version, task config incl. limit, seed). Timings (seconds, tokens/s, memory, MFU, FLOP/s) are
machine-bound, not a correctness check: they are judged apart, agreeing when scratch is within a factor
of `TIMING_FACTOR` of its reference, and never count in the quality verdict.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness.api import MODELS, REPORT_SECTIONS, TASKS, HarnessError, latest, load_results, metric_spec, now_iso
from harness.api.formatting import _missing, _with_stderr, fmt_delta, fmt_value
from harness.api.kinds import TIMING_FACTOR, headline_metric, metric_kind
from harness.api.verdicts import (
    Check,
    block_checks,
    judge,
    pair_allowed,
    reference_of,
    timing_verdict,
    verdict,
    verdict_cell,
)

__all__ = ["TIMING_FACTOR", "metric_kind", "write_report", "judge", "verdict", "fmt_value", "run_verdicts",
           "verdict_cell", "fmt_delta"]

_pair_allowed = pair_allowed  # the name tests/harness/test_api.py holds the gate to

KEY = ("model", "weights", "variant", "limit", "task", "subtask", "metric")


# ---- the report -------------------------------------------------------------------------------------


def select_runs(df: pd.DataFrame, run_ids: list[str] | None = None, latest_run: bool = False) -> pd.DataFrame:
    """Rows of the named runs (`--run-id`, ids or unique prefixes) or of the newest run (`--latest`)."""
    if df.empty or not (run_ids or latest_run):
        return df
    if latest_run:
        if run_ids:
            raise HarnessError("--latest and --run-id: give one of them (the newest run, or the runs named)")
        newest = df.sort_values("created_at", kind="stable")["run_id"].iloc[-1]
        return df[df["run_id"] == newest].reset_index(drop=True)
    known = sorted(df["run_id"].unique())
    chosen = []
    for wanted in run_ids:
        hits = [r for r in known if r == wanted] or [r for r in known if r.startswith(wanted)]
        if len(hits) != 1:
            what = "matches no run" if not hits else f"matches {len(hits)} runs"
            shown = ", ".join(known[-10:]) + (f" (and {len(known) - 10} older)" if len(known) > 10 else "")
            raise HarnessError(f"--run-id {wanted}: {what} in these results; give an id or a unique prefix of one "
                               f"of: {shown}")
        chosen.append(hits[0])
    return df[df["run_id"].isin(chosen)].reset_index(drop=True)


def write_report(locations: list[str], out: str, run_ids: list[str] | None = None, latest_run: bool = False) -> Path:
    df = select_runs(load_results(*locations), run_ids, latest_run)
    out_path = Path(out)
    fig_dir = out_path.parent / "figures"
    scope = f" (runs {', '.join(sorted(df['run_id'].unique()))})" if (run_ids or latest_run) and not df.empty else ""
    parts = [
        f"# Harness report\n\nGenerated {now_iso()} from {len(df)} result rows in "
        f"{', '.join(f'`{loc}`' for loc in locations)}{scope}.\n"
    ]
    if df.empty:
        parts.append("No results yet: run `harness run ...` first.\n")
    else:
        fig_dir.mkdir(parents=True, exist_ok=True)
        df = _with_plan_columns(df)
        newest = latest(df, KEY)
        cards: list[dict] = []
        sections = []
        for task in sorted(newest["task"].unique()):
            sections.append(task_section(task, newest[newest["task"] == task], df[df["task"] == task], fig_dir,
                                         out_path, cards))
        parts += [scorecard(cards, newest), *sections, provenance_section(df)]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(parts), encoding="utf-8")
    return out_path


def _with_plan_columns(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["variant"] = [_variant(task, cfg) for task, cfg in zip(df["task"], df["config"])]
    df["limit"] = [_limit(cfg) for cfg in df["config"]]
    return df


def _variant(task: str, config) -> str:
    """The task's label for this row's kind of run ("" unless the task tells runs apart)."""
    if task not in TASKS or not isinstance(config, dict):
        return ""
    return TASKS.get(task).variant(config)


def _limit(config) -> str:
    """The run's `--limit` as the report shows it: "all" when every document/example was used."""
    value = config.get("limit") if isinstance(config, dict) else None
    return "all" if value is None else str(value)


def _anchor(*parts: str) -> str:
    return "-".join("".join(c if c.isalnum() else "-" for c in p.lower()).strip("-") for p in parts if p)


def task_section(task: str, newest: pd.DataFrame, history: pd.DataFrame, fig_dir: Path, out_path: Path,
                 cards: list[dict] | None = None) -> str:
    cls = TASKS.get(task) if task in TASKS else None
    title = f"## Task `{task}`" + (f" (v{newest['task_version'].iloc[-1]})" if "task_version" in newest else "")
    lines = [f'<a id="{_anchor("task", task)}"></a>', "", title, "", cls.description if cls else "", ""]
    for (weights, variant, limit), block in newest.groupby(["weights", "variant", "limit"], sort=True):
        anchor = _anchor(task, weights, variant, "" if limit == "all" else f"limit {limit}")
        heading = (f"### weights `{weights}`" + (f", {variant}" if variant else "")
                   + ("" if limit == "all" else f", --limit {limit}"))
        checks = block_checks(task, block)
        lines += [f'<a id="{anchor}"></a>', "", heading, ""]
        quality = block_table(task, block, checks, limit)
        lines += [quality, ""] if quality else []
        timings = block_table(task, block, checks, limit, timing=True)
        if timings:
            lines += [f"Timings (machine-bound, not a correctness check; scratch agrees within {TIMING_FACTOR:g}x "
                      "of its reference):", "", timings, ""]
        plot = plot_task(task, weights, block, fig_dir, variant + ("" if limit == "all" else f" limit {limit}"),
                         checks)
        if plot is not None:
            lines += [f"![{task} {weights}]({plot.relative_to(out_path.parent).as_posix()})", ""]
            if checks:
                lines += ["_Blue: scratch, orange: reference; black caps on a scratch bar: the values its reference "
                          "allows; dashed red: a parity threshold._", ""]
        if cards is not None:
            cards += _cards(task, weights, variant, limit, block, checks, anchor, history)
    custom = getattr(cls, "report_section", None) or (REPORT_SECTIONS.get(task) if task in REPORT_SECTIONS else None)
    if custom is not None:
        lines.append(custom(history, fig_dir, out_path.parent) or "")
    return "\n".join(lines)


def block_table(task: str, block: pd.DataFrame, checks: dict[str, list[Check]], limit: str,
                timing: bool = False) -> str:
    """One table for one weights: the models side by side, n, limit, tolerance and verdict per metric.
    `timing` picks the timing rows (their own table), else the quality rows."""
    kinds = {m: metric_kind(m, metric_spec(task, m, None)) for m in block["metric"].unique()}
    rows = block[[(kinds[m] == "timing") == timing for m in block["metric"]]]
    if rows.empty:
        return "" if timing or not block.empty else "_no rows on these weights_"
    models = sorted(rows["model"].unique(), key=_pair_order)
    by_key = {(c.subtask, c.metric): [] for cs in checks.values() for c in cs}
    for cs in checks.values():
        for c in cs:
            by_key[(c.subtask, c.metric)].append(c)
    pairs = len(checks) > 0
    header = ["subtask", "metric", *models, "n", "limit"] + (["tolerance", "within"] if pairs else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (subtask, metric), group in rows.groupby(["subtask", "metric"], sort=True):
        kind = kinds[metric]
        cells = []
        for model in models:
            r = group[group["model"] == model]
            cells.append("-" if r.empty else _with_stderr(r["value"].iloc[-1], r["stderr"].iloc[-1], kind, metric))
        ns = sorted({int(n) for n in group["n"] if not _missing(n)})
        line = [subtask or "-", metric, *cells, " / ".join(f"{n:,}" for n in ns) or "-", limit]
        if pairs:
            line += _verdict_cells(by_key.get((subtask, metric), []))
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def _verdict_cells(checks: list[Check]) -> list[str]:
    """The tolerance and verdict cells of one table row (several pairs: one entry per scratch model)."""
    if not checks:
        return ["-", "-"]
    rules = sorted({c.rule for c in checks})
    many = len(checks) > 1

    def word(c: Check) -> str:
        text = "-" if c.ok is None else ("yes" if c.ok else "**NO**")
        if c.ok is False and c.timing and c.ref_value:  # machine-bound: a note, not a failure
            text = f"outside {TIMING_FACTOR:g}x ({c.value / c.ref_value:.2f}x)"
        elif c.ok is False and c.delta is not None:
            text += f" ({fmt_delta(c.delta)})"
        return f"{c.scratch}: {text}" if many and c.ok is not True else text

    if not many:
        return ["; ".join(rules), word(checks[0])]
    passed = sum(c.ok is True for c in checks)
    if passed == len(checks):
        return ["; ".join(rules), f"yes ({passed})"]
    words = [word(c) for c in checks if c.ok is not True] + ([f"yes ({passed} other{'s' if passed > 1 else ''})"]
                                                            if passed else [])
    return ["; ".join(rules), "; ".join(words)]


def _cards(task, weights, variant, limit, block, checks, anchor, history=None) -> list[dict]:
    """Scorecard rows for one block: one per scratch model that has a reference, plus references run alone.
    A task whose rows never include a reference's (`history`: all of the task's rows) judges the scratch model
    on its own (e.g. mutants): "scratch only", not "not run"."""
    cards = []
    present = set(block["model"])
    models = set((history if history is not None else block)["model"])
    for scratch, cs in checks.items():
        reference = cs[0].reference if cs else reference_of(scratch, block[block["model"] == scratch])
        ran = reference in present
        text = verdict(cs, ran, reference)
        if text.startswith("not run") and reference not in models:
            text = "scratch only: this task has no reference rows"
        headline = _headline(task, block[block["model"] == scratch])
        cards.append(dict(task=task, scratch=scratch, reference=reference, weights=weights, variant=variant,
                          limit=limit, anchor=anchor, headline=headline, verdict=text,
                          timing=timing_verdict(cs), **_headline_values(task, block, scratch, reference, headline)))
    headline = _headline(task, block)
    scratch_of = {reference_of(m): m for m in MODELS.names()} if len(present) else {}
    for model in sorted(present - set(checks)):
        scratch = scratch_of.get(model)
        if scratch is not None and scratch not in present:
            cards.append(dict(task=task, scratch=scratch, reference=model, weights=weights, variant=variant,
                              limit=limit, anchor=anchor, headline=headline, timing="-",
                              verdict=f"not run: no {scratch} rows on these weights",
                              **_headline_values(task, block, scratch, model, headline)))
    return cards


def _headline(task: str, block: pd.DataFrame) -> str:
    cls = TASKS.get(task) if task in TASKS else None
    wanted = headline_metric(task, cls)
    metrics = list(block["metric"].unique())
    if wanted in metrics:
        return wanted
    quality = [m for m in metrics if metric_kind(m, metric_spec(task, m, None)) != "timing"]
    ordered = [m for m in (cls.metrics if cls else {}) if m in quality] or sorted(quality) or sorted(metrics)
    return ordered[0]


def _headline_values(task, block, scratch, reference, metric) -> dict:
    kind = metric_kind(metric, metric_spec(task, metric, None))
    rows = block[block["metric"] == metric]

    def side(model: str) -> tuple[str, list[int]]:
        r = rows[rows["model"] == model]
        if r.empty:
            return "-", []
        ns = [int(n) for n in r["n"] if not _missing(n)]
        if len(r) == 1:
            return _with_stderr(r["value"].iloc[0], r["stderr"].iloc[0], kind, metric), ns
        if kind == "count":
            return f"{fmt_value(r['value'].sum(), kind, metric)} (total of {len(r)})", ns
        return f"{fmt_value(r['value'].mean(), kind, metric)} (mean of {len(r)})", ns

    ours, n_ours = side(scratch)
    theirs, n_theirs = side(reference)
    if ours != "-" and kind in ("diff", "flag") and theirs == "-":
        theirs = "(the diff is scratch vs reference)" if kind == "diff" else "(scratch vs reference)"
    ns = sorted(set(n_ours + n_theirs))
    n = "-" if not ns else (f"{ns[0]:,}" if len(ns) == 1 else f"{ns[0]:,}-{ns[-1]:,}")
    return dict(scratch_value=ours, reference_value=theirs, n=n)


def scorecard(cards: list[dict], newest: pd.DataFrame) -> str:
    """The report's first table: every pair and task with its headline metric and verdict."""
    lines = ['<a id="scorecard"></a>', "", "## Scorecard", ""]
    if not cards:
        return "\n".join(lines + ["_no scratch/reference pair in these rows_", ""])
    counts = {word: sum(c["verdict"].startswith(start) for c in cards) for word, start in
              (("agree", "agrees"), ("diverge", "**diverges"), ("not run", "not run"), ("timings only", "timings"),
               ("scratch only", "scratch only"))}
    counts["not compared"] = len(cards) - sum(counts.values())
    summary = ", ".join(f"{n} {word}" for word, n in counts.items() if n or word in ("agree", "diverge"))
    lines += [f"**{summary}** (of {len(cards)} scratch/reference pairs x task x weights). A verdict covers "
              "every quality metric of the pair on those weights, each within its task's tolerance "
              "(harness/api/tolerance.py); timings are listed "
              f"apart (scratch within {TIMING_FACTOR:g}x of its reference) and never decide a verdict.", ""]
    header = ["task", "scratch", "reference", "weights", "headline metric", "scratch value", "reference value", "n",
              "limit", "verdict", "timings"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = {"**": 0, "no": 1, "ag": 2}
    for c in sorted(cards, key=lambda c: (order.get(c["verdict"][:2], 1), c["task"], c["scratch"], c["weights"])):
        weights = f"`{c['weights']}`" + (f", {c['variant']}" if c["variant"] else "")
        cells = [f"[{c['task']}](#{c['anchor']})", c["scratch"], c["reference"] or "-", weights, c["headline"],
                 c["scratch_value"], c["reference_value"], c["n"], c["limit"], f"[{c['verdict']}](#{c['anchor']})",
                 c["timing"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------------------


def plot_task(task: str, weights: str, block: pd.DataFrame, fig_dir: Path, variant: str = "",
              checks: dict[str, list[Check]] | None = None) -> Path | None:
    """One bar chart per metric (scratch blue, reference orange) with the tolerance drawn: a dashed line at
    a parity threshold, and on each scratch bar the band its reference allows (black caps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted(block["metric"].unique())
    if not metrics:
        return None
    by_key = {(c.scratch, c.subtask, c.metric): c for cs in (checks or {}).values() for c in cs}
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        _plot_metric(ax, task, block[block["metric"] == metric], metric, by_key)
    fig.tight_layout()
    path = fig_dir / (f"{task}_{_slug(weights)}" + (f"_{_slug(variant)}" if variant else "") + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_metric(ax, task: str, sub: pd.DataFrame, metric: str, by_key: dict) -> None:
    spec = metric_spec(task, metric, None)
    values = [float(v) for v in sub["value"]]
    labels = [f"{m}\n{s}" if s else m for m, s in zip(sub["model"], sub["subtask"])]
    threshold = spec.threshold
    floor = None
    if threshold is not None and threshold > 0:  # parity: log scale, zeros drawn at a floor and labelled 0
        positive = [v for v in values if v > 0]
        floor = min([threshold, *positive]) / 1e3
        ax.set_yscale("log")
    heights = [max(v, floor) if floor else v for v in values]
    ax.bar(range(len(sub)), heights, color=["#4c72b0" if "scratch" in m else "#dd8452" for m in sub["model"]])
    for x, (model, subtask) in enumerate(zip(sub["model"], sub["subtask"])):
        check = by_key.get((model, subtask, metric))
        if check is not None and check.ref_value is not None and check.ok is not None:
            low, high = _band(check)
            if math.isfinite(low) and math.isfinite(high):
                ax.errorbar(x, check.ref_value, yerr=[[check.ref_value - low], [high - check.ref_value]],
                            fmt="none", ecolor="black", capsize=4, lw=1)
    if threshold is not None:
        ax.axhline(threshold, color="#c44e52", ls="--", lw=1, label=f"threshold {threshold:g}")
        ax.legend(fontsize=6, loc="upper right")
        for x, v in enumerate(values):
            ax.annotate(fmt_value(v, "diff"), (x, max(v, floor or v)), ha="center", va="bottom", fontsize=6)
    elif all(v > 0 for v in values) and max(values) / max(min(values), 1e-300) > 100:
        ax.set_yscale("log")
    ax.set_xticks(range(len(sub)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_title(metric, fontsize=9)


def _band(check: Check) -> tuple[float, float]:
    """The interval of scratch values the reference allows."""
    ref = check.ref_value or 0.0
    if check.timing:
        return ref / TIMING_FACTOR, ref * TIMING_FACTOR
    allowed = check.allowed or 0.0
    return ref - allowed, ref + allowed


# ---- provenance and helpers ---------------------------------------------------------------------------


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


def _pair_order(model: str) -> tuple[str, int]:
    arch, _, impl = model.rpartition("-")
    return (arch or impl, 0 if impl == "scratch" else 1)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")[:60]


def run_verdicts(rows: list) -> dict[tuple, Check]:
    """The checks of one `harness run`'s rows (ResultRow objects), keyed (model, task, weights, subtask, metric),
    for the terminal table: a scratch row next to its reference's row of the same run and plan."""
    from dataclasses import asdict

    if not rows:
        return {}
    df = _with_plan_columns(pd.DataFrame([asdict(r) for r in rows]))
    out = {}
    for (task, weights, _, _), block in latest(df, KEY).groupby(["task", "weights", "variant", "limit"], sort=False):
        for checks in block_checks(task, block).values():
            for c in checks:
                out[(c.scratch, task, weights, c.subtask, c.metric)] = c
    return out
