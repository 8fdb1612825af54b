"""Judging a scratch model against its reference on the same weights: one `Check` per metric, and the
words of a verdict (the report's scorecard and tables, the terminal table of `harness run`).

Verdicts use the one tolerance rule (harness/api/tolerance.py) with each metric's `MetricSpec`:
a metric with a `threshold` is a difference already (parity) and must stay under it; a `*_equal` metric
must be 1; any other metric agrees when |scratch - reference| <= pair_atol + pair_rtol x |reference|
(or the 95% noise band of the two stderrs). Two rows are compared only when their plans match (task
version, task config incl. limit, seed). Timings are judged apart: scratch agrees within a factor of
`TIMING_FACTOR` of its reference, and never count in the quality verdict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from harness.api.errors import HarnessError
from harness.api.formatting import _missing, fmt_delta, fmt_tol, fmt_value
from harness.api.kinds import TIMING_FACTOR, metric_kind
from harness.api.registry import MODELS
from harness.api.task import MetricSpec, metric_spec
from harness.api.tolerance import allowed_difference


@dataclass(frozen=True)
class Check:
    """One metric of a scratch model judged against its reference on the same weights."""

    scratch: str
    reference: str
    subtask: str
    metric: str
    kind: str
    value: float
    ref_value: float | None  # None: the value is itself a scratch-vs-reference difference (parity)
    rule: str  # "<= 1e-05", "== 1", "±0.05" (|scratch - reference|), "within 2x", or why nothing was compared
    ok: bool | None  # None: not compared (the plans differ)
    delta: float | None = None
    allowed: float | None = None

    @property
    def timing(self) -> bool:
        return self.kind == "timing"

    def badness(self) -> float:
        """How far past its limit (for picking the worst failure): |delta| / allowed, or value / threshold."""
        if self.delta is not None and self.allowed:
            return abs(self.delta) / self.allowed if math.isfinite(self.allowed) else 0.0
        if self.ref_value is None and self.allowed:
            return abs(self.value) / self.allowed
        return math.inf if self.ok is False else 0.0

    def describe(self) -> str:
        """`valid_rate n=4: -0.806 (allowed 0.05)` or `max_abs_logit_diff: 2.3e-05 > 1e-05`."""
        where = f"{self.metric}" + (f" {self.subtask}" if self.subtask else "")
        if self.ok is None:
            return f"{where}: {self.rule}"
        if self.timing and self.ref_value:
            return f"{where}: {self.value / self.ref_value:.2f}x the reference's"
        if self.delta is not None:
            return f"{where}: {fmt_delta(self.delta)} (allowed {fmt_tol(self.allowed or 0.0)})"
        return f"{where}: {fmt_value(self.value, self.kind, self.metric)}, needs {self.rule}"


def _plan(row) -> str:
    config, seed = row.get("config"), row.get("seed")
    seed = None if _missing(seed) else int(seed)
    return json.dumps([config if isinstance(config, dict) else None, seed, str(row.get("task_version"))],
                      sort_keys=True, default=str)


def judge(task: str, scratch: str, reference: str, row, ref_row=None) -> Check | None:
    """The check of one scratch row (a dict or Series) against its reference's row (None: not run, or a
    metric the reference has no row for); None when there is nothing to judge."""
    metric, value = row["metric"], float(row["value"])
    spec = metric_spec(task, metric, row.get("higher_is_better"))
    kind = metric_kind(metric, spec)
    base = dict(scratch=scratch, reference=reference, subtask=row.get("subtask") or "", metric=metric, kind=kind)
    if spec.threshold is not None:
        return Check(**base, value=value, ref_value=None, rule=f"<= {spec.threshold:g}", ok=value <= spec.threshold,
                     allowed=spec.threshold)
    if kind == "flag":
        return Check(**base, value=value, ref_value=None, rule="== 1", ok=value == 1.0)
    if ref_row is None:
        return None
    ref_value = float(ref_row["value"])
    if _plan(row) != _plan(ref_row):
        return Check(**base, value=value, ref_value=ref_value, rule="not compared: the plans differ", ok=None)
    if kind == "timing":
        ratio = value / ref_value if ref_value else math.inf
        ok = 1 / TIMING_FACTOR <= ratio <= TIMING_FACTOR
        return Check(**base, value=value, ref_value=ref_value, rule=f"within {TIMING_FACTOR:g}x", ok=ok,
                     delta=value - ref_value)
    allowed = pair_allowed(spec, ref_value, row.get("stderr"), ref_row.get("stderr"))
    delta = value - ref_value
    return Check(**base, value=value, ref_value=ref_value, rule=f"±{fmt_tol(allowed)}", ok=abs(delta) <= allowed,
                 delta=delta, allowed=allowed)


def pair_allowed(spec: MetricSpec, ref_value: float, se1, se2) -> float:
    return allowed_difference(spec.pair_atol + spec.pair_rtol * abs(ref_value), se1, se2)



def reference_of(model: str, rows: pd.DataFrame | None = None) -> str | None:
    """The registered reference of `model`, or the one its rows name (`extra.reference`, parity)."""
    if rows is not None and not rows.empty:
        for extra in rows["extra"]:
            if isinstance(extra, dict) and extra.get("reference"):
                return str(extra["reference"])
    try:
        return MODELS.get(model).info.reference if model in MODELS else None
    except HarnessError:
        return None


def block_checks(task: str, block: pd.DataFrame) -> dict[str, list[Check]]:
    """Every check of every scratch model in `block` (one task, weights, variant and limit), by scratch model."""
    out: dict[str, list[Check]] = {}
    for scratch in sorted(block["model"].unique()):
        ours = block[block["model"] == scratch]
        reference = reference_of(scratch, ours)
        if reference is None:
            continue
        theirs = block[block["model"] == reference].set_index(["subtask", "metric"])
        checks = []
        for _, row in ours.iterrows():
            key = (row["subtask"], row["metric"])
            ref_row = theirs.loc[key] if key in theirs.index else None
            if isinstance(ref_row, pd.DataFrame):
                ref_row = ref_row.iloc[-1]
            check = judge(task, scratch, reference, row, ref_row)
            if check is not None:
                checks.append(check)
        out[scratch] = checks
    return out


def verdict(checks: Iterable[Check], reference_ran: bool = True, reference: str = "") -> str:
    """The scorecard's words for a pair's quality checks: agrees (k metrics) / diverges: ... / not run."""
    checks = list(checks)
    quality = [c for c in checks if not c.timing]
    if not reference_ran and not any(c.ref_value is None for c in quality):
        return f"not run: no {reference} rows on these weights" if reference else "not run"
    judged = [c for c in quality if c.ok is not None]
    if not judged:
        if quality:
            return "not compared: the plans differ"
        return "timings only" if any(c.timing for c in checks) else "nothing to compare"
    bad = [c for c in judged if not c.ok]
    if not bad:
        return f"agrees ({len(judged)} metric{'s' if len(judged) != 1 else ''})"
    worst = max(bad, key=Check.badness)
    return f"**diverges**: {len(bad)} of {len(judged)} metrics; worst {worst.describe()}"


def timing_verdict(checks: Iterable[Check]) -> str:
    timed = [c for c in checks if c.timing and c.ok is not None]
    if not timed:
        return "-"
    bad = [c for c in timed if not c.ok]
    if not bad:
        return f"within {TIMING_FACTOR:g}x ({len(timed)})"
    worst = max(bad, key=lambda c: abs(math.log(c.value / c.ref_value)) if c.value > 0 and c.ref_value else math.inf)
    return f"{len(bad)} of {len(timed)} outside {TIMING_FACTOR:g}x; worst {worst.describe()}"


def verdict_cell(check: Check | None) -> str:
    """A check in a few words for a terminal: `yes (±0.036)`, `NO +0.0954 (±0.02)`, `1.07x (within 2x)`."""
    if check is None:
        return ""
    if check.ok is None:
        return check.rule
    word = "yes" if check.ok else "NO"
    if check.timing and check.ref_value:  # machine-bound: a note, never a failure
        ratio = check.value / check.ref_value
        return f"{ratio:.2f}x ({'within' if check.ok else 'outside'} {TIMING_FACTOR:g}x)"
    if check.delta is not None and not check.ok:
        return f"{word} {fmt_delta(check.delta)} ({check.rule})"
    return f"{word} ({check.rule})"
