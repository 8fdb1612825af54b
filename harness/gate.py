"""`harness gate`: compare the newest results with a committed baseline and fail on regressions.

For every (model, weights, task, subtask, metric) in the baseline that the results also have, the
metric's direction decides what a regression is, and the allowed slack is the largest of
  abs tolerance, rel tolerance x |baseline|, and 1.96 x sqrt(stderr_new^2 + stderr_base^2)
(the last only where both rows carry a stderr). Tolerances default to the task's MetricSpec and
can be overridden per metric (`--tol word_perplexity=rel:0.01`). Diff-like metrics with a
threshold (parity) also fail when they exceed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd
from rich.table import Table

from harness.api import HarnessError, allowed_difference, latest, load_results, metric_spec

KEY = ("model", "weights", "task", "subtask", "metric")


@dataclass(frozen=True)
class Tolerance:
    atol: float = 0.0
    rtol: float = 0.0


@dataclass
class Check:
    key: tuple
    baseline: float
    current: float | None
    allowed: float
    status: str  # "ok", "improved", "REGRESSED", "MISSING", "OVER THRESHOLD", "skipped"


def parse_tolerances(items: list[str]) -> dict[str, Tolerance]:
    out: dict[str, Tolerance] = {}
    for item in items:
        metric, _, spec = item.partition("=")
        kind, _, number = spec.partition(":")
        if kind not in ("abs", "rel") or not metric:
            raise HarnessError(f"--tol {item!r}: expected METRIC=abs:X or METRIC=rel:Y")
        try:
            value = float(number)
        except ValueError as e:
            raise HarnessError(f"--tol {item!r}: {number!r} is not a number") from e
        old = out.get(metric, Tolerance())
        out[metric] = Tolerance(value, old.rtol) if kind == "abs" else Tolerance(old.atol, value)
    return out


def gate(baseline: str, results_dir: str, overrides: dict[str, Tolerance], require_all: bool = False,
         skip: set[str] = frozenset()):
    base = latest(load_results(baseline), KEY)
    current = latest(load_results(results_dir), KEY)
    if base.empty:
        raise HarnessError(f"baseline '{baseline}' holds no result rows")
    checks = [compare(row, current, overrides) for _, row in base.iterrows()]
    checks = [replace(c, status="skipped") if c.key[KEY.index("metric")] in skip else c for c in checks]
    failing = {"REGRESSED", "OVER THRESHOLD"} | ({"MISSING"} if require_all else set())
    regressions = [c for c in checks if c.status in failing]
    return regressions, render(checks, failing)


def compare(base_row: pd.Series, current: pd.DataFrame, overrides: dict[str, Tolerance]) -> Check:
    key = tuple(base_row[k] for k in KEY)
    match = current
    for k, v in zip(KEY, key):
        match = match[match[k] == v] if not match.empty else match
    if match.empty:
        return Check(key, base_row["value"], None, float("nan"), "MISSING")
    row = match.iloc[-1]
    spec = metric_spec(base_row["task"], base_row["metric"], base_row["higher_is_better"])
    tol = overrides.get(base_row["metric"], Tolerance(spec.gate_atol, spec.gate_rtol))
    allowed = allowed_difference(max(tol.atol, tol.rtol * abs(base_row["value"])), base_row.get("stderr"),
                                 row.get("stderr"))
    delta = row["value"] - base_row["value"]
    status = _status(delta, allowed, spec.higher_is_better)
    if spec.threshold is not None and row["value"] > spec.threshold:
        status = "OVER THRESHOLD"
    return Check(key, base_row["value"], row["value"], allowed, status)


def _status(delta: float, allowed: float, higher_is_better: bool | None) -> str:
    if math.isnan(delta):
        return "REGRESSED"
    if higher_is_better is None:
        return "ok" if abs(delta) <= allowed else "REGRESSED"
    worse = -delta if higher_is_better else delta
    if worse > allowed:
        return "REGRESSED"
    return "improved" if worse < -allowed else "ok"


def render(checks: list[Check], failing: set[str]) -> Table:
    table = Table(title=f"gate: {sum(c.status in failing for c in checks)} failing of {len(checks)} baseline metrics")
    for col in ("model", "weights", "task", "subtask", "metric", "baseline", "current", "allowed", "status"):
        table.add_column(col)
    for c in sorted(checks, key=lambda c: (c.status not in failing, c.key)):
        style = "red" if c.status in failing else ("green" if c.status == "improved" else "")
        current = "-" if c.current is None else f"{c.current:.6g}"
        table.add_row(*map(str, c.key), f"{c.baseline:.6g}", current, f"{c.allowed:.3g}", c.status, style=style)
    return table
