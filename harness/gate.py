"""`harness gate`: compare the newest results with a committed baseline and fail on regressions.

A baseline row and a current row are compared only when both their key (model, weights, task,
subtask, metric) and their *plan* match: task version, task config (which includes `limit`), seed
and weights hash. The newest plan-matching current row is held to the baseline: the metric's
direction decides what a regression is, and the allowed slack is the largest of
  abs tolerance, rel tolerance x |baseline|, and 1.96 x sqrt(stderr_new^2 + stderr_base^2)
(the one rule of harness/api/tolerance.py; the noise term only where the rows carry a stderr).
Tolerances default to the task's MetricSpec and can be overridden per metric
(`--tol word_perplexity=rel:0.01`). Diff-like metrics with a threshold (parity) also fail when they
exceed it.

Statuses: ok, improved, REGRESSED, OVER THRESHOLD (compared); config differs (same key, another
plan: never compared, never a regression, never a pass), MISSING (no current row with the key),
skipped (--skip), new (a current key the baseline lacks; listed, never failing).

Exit codes (docs/ci.md): 0 passed; 1 a regression (REGRESSED / OVER THRESHOLD); 3 nothing was
compared, or, with --require-all, a baseline metric is MISSING or its config differs; 2 usage errors.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
from rich.table import Table

from harness.api import HarnessError, allowed_difference, latest, load_results, metric_spec

KEY = ("model", "weights", "task", "subtask", "metric")
PLAN = ("task_version", "config", "seed", "weights_sha256")

EXIT_PASSED, EXIT_REGRESSED, EXIT_USAGE, EXIT_NOT_COMPARED = 0, 1, 2, 3
REGRESSION = frozenset({"REGRESSED", "OVER THRESHOLD"})
COMPARED = frozenset({"ok", "improved"}) | REGRESSION
NOT_COMPARED = frozenset({"MISSING", "config differs"})  # failing (exit 3) with --require-all
STATUSES = ("ok", "improved", "REGRESSED", "OVER THRESHOLD", "MISSING", "config differs", "skipped", "new")
COLUMNS = ("model", "weights", "task", "subtask", "metric", "baseline", "current", "allowed", "status", "reason")


@dataclass(frozen=True)
class Tolerance:
    atol: float = 0.0
    rtol: float = 0.0


@dataclass
class Check:
    key: tuple
    baseline: float | None  # None for a "new" row
    current: float | None  # None when MISSING
    allowed: float  # nan when nothing was compared
    status: str  # one of STATUSES
    reason: str = ""
    tolerance: float = float("nan")  # the metric's own, before the stderr widening
    threshold: float | None = None


@dataclass
class Verdict:
    checks: list[Check]
    failing: frozenset[str]
    exit_code: int
    verdict: str  # "passed" or "FAILED: ..."
    baseline: str = ""
    results_dir: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def compared(self) -> int:
        return sum(c.status in COMPARED for c in self.checks)

    @property
    def table(self) -> Table:
        return render(self)


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
         skip: set[str] = frozenset()) -> Verdict:
    base = latest(load_results(baseline), KEY)
    current = load_results(results_dir)
    if base.empty:
        raise HarnessError(f"baseline '{baseline}' holds no result rows")
    checks = [compare(row, current, overrides) for _, row in base.iterrows()]
    checks = [_skipped(c) if c.key[KEY.index("metric")] in skip else c for c in checks]
    checks += new_rows(base, current)
    failing = REGRESSION | (NOT_COMPARED if require_all else frozenset())
    code, verdict = _exit(checks, require_all)
    counts = Counter(c.status for c in checks)
    return Verdict(checks, failing, code, verdict, str(baseline), str(results_dir),
                   {s: counts[s] for s in STATUSES if counts[s]})


def _exit(checks: list[Check], require_all: bool) -> tuple[int, str]:
    statuses = Counter(c.status for c in checks)
    if any(statuses[s] for s in REGRESSION):
        return EXIT_REGRESSED, "FAILED: regression"
    if not any(statuses[s] for s in COMPARED):
        return EXIT_NOT_COMPARED, "FAILED: nothing compared (no baseline metric has a current row with the same plan)"
    if require_all and any(statuses[s] for s in NOT_COMPARED):
        return EXIT_NOT_COMPARED, "FAILED: baseline metrics not compared (--require-all)"
    return EXIT_PASSED, "passed"


def _skipped(check: Check) -> Check:
    return replace(check, status="skipped", reason=f"--skip: listed, not gated (would be {check.status})")


def _select(df: pd.DataFrame, key: tuple) -> pd.DataFrame:
    for k, v in zip(KEY, key):
        if df.empty:
            return df
        df = df[df[k] == v] if k in df.columns else df.iloc[0:0]
    return df


def _plan_value(row: pd.Series, name: str):
    value = row.get(name)
    if isinstance(value, float) and math.isnan(value):
        return None
    if name == "seed" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _same_plan(a: pd.Series, b: pd.Series) -> bool:
    return all(_plan_value(a, name) == _plan_value(b, name) for name in PLAN)


def _show(value) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def plan_differences(base_row: pd.Series, row: pd.Series) -> list[str]:
    """What differs between two rows' plans, baseline -> current (e.g. "limit 4 -> None")."""
    out = []
    for name in ("task_version", "seed", "weights_sha256"):
        a, b = _plan_value(base_row, name), _plan_value(row, name)
        if a != b:
            if name == "weights_sha256":
                a, b = (str(v)[:12] if v else v for v in (a, b))
            out.append(f"{name} {a} -> {b}")
    ca, cb = _plan_value(base_row, "config") or {}, _plan_value(row, "config") or {}
    absent = object()
    for k in sorted(set(ca) | set(cb)):
        a, b = ca.get(k, absent), cb.get(k, absent)
        if a != b:
            out.append(f"{k} {'(absent)' if a is absent else _show(a)} -> {'(absent)' if b is absent else _show(b)}")
    return out


def compare(base_row: pd.Series, current: pd.DataFrame, overrides: dict[str, Tolerance]) -> Check:
    key = tuple(base_row[k] for k in KEY)
    same_key = _select(current, key)
    if same_key.empty:
        return Check(key, base_row["value"], None, float("nan"), "MISSING", "no current row with this key")
    same_plan = same_key[[_same_plan(base_row, r) for _, r in same_key.iterrows()]]
    if same_plan.empty:
        row = same_key.iloc[-1]
        return Check(key, base_row["value"], row["value"], float("nan"), "config differs",
                     "; ".join(plan_differences(base_row, row)))
    row = same_plan.iloc[-1]
    spec = metric_spec(base_row["task"], base_row["metric"], base_row["higher_is_better"])
    tol = overrides.get(base_row["metric"], Tolerance(spec.gate_atol, spec.gate_rtol))
    tolerance = max(tol.atol, tol.rtol * abs(base_row["value"]))
    allowed = allowed_difference(tolerance, base_row.get("stderr"), row.get("stderr"))
    delta = row["value"] - base_row["value"]
    status, reason = _status(delta, allowed, spec.higher_is_better)
    if spec.threshold is not None and row["value"] > spec.threshold:
        status, reason = "OVER THRESHOLD", f"{row['value']:.3g} > threshold {spec.threshold:.3g}"
    return Check(key, base_row["value"], row["value"], allowed, status, reason, tolerance, spec.threshold)


def _status(delta: float, allowed: float, higher_is_better: bool | None) -> tuple[str, str]:
    if math.isnan(delta):
        return "REGRESSED", "value is nan"
    if higher_is_better is None:
        return ("ok", "") if abs(delta) <= allowed else ("REGRESSED", f"|delta| {abs(delta):.3g} > {allowed:.3g}")
    worse = -delta if higher_is_better else delta
    if worse > allowed:
        return "REGRESSED", f"worse by {worse:.3g} > allowed {allowed:.3g}"
    return ("improved", f"better by {-worse:.3g}") if worse < -allowed else ("ok", "")


def new_rows(base: pd.DataFrame, current: pd.DataFrame) -> list[Check]:
    """The newest current row of each key the baseline does not have."""
    if current.empty:
        return []
    known = {tuple(r[k] for k in KEY) for _, r in base.iterrows()}
    out = []
    for _, row in latest(current, KEY).iterrows():
        key = tuple(row[k] for k in KEY)
        if key not in known:
            out.append(Check(key, None, row["value"], float("nan"), "new", "not in the baseline"))
    return out


# ---- output: the console table, JUnit XML, JSON, a GitHub step summary -------------------------------------------

def _order(verdict: Verdict):
    rank = {s: i for i, s in enumerate(("REGRESSED", "OVER THRESHOLD", "MISSING", "config differs"))}
    return sorted(verdict.checks, key=lambda c: (c.status not in verdict.failing, rank.get(c.status, 9), c.key))


def _num(value: float | None, spec: str = ".6g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _cells(c: Check) -> list[str]:
    return [*map(str, c.key), _num(c.baseline), _num(c.current), _num(c.allowed, ".3g"), c.status, c.reason]


def summary_line(verdict: Verdict) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in verdict.counts.items())
    return f"gate: {verdict.verdict} (exit {verdict.exit_code}); {verdict.compared} compared; {counts}"


def render(verdict: Verdict) -> Table:
    n_base = sum(c.status != "new" for c in verdict.checks)
    n_failing = sum(c.status in verdict.failing for c in verdict.checks)
    table = Table(title=f"gate: {n_failing} failing, {verdict.compared} compared, of {n_base} baseline metrics")
    for col in COLUMNS:
        table.add_column(col)
    for c in _order(verdict):
        style = "red" if c.status in verdict.failing else {"improved": "green", "config differs": "yellow"}.get(
            c.status, "")
        table.add_row(*_cells(c), style=style)
    return table


def markdown(verdict: Verdict) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [f"### harness gate: {verdict.verdict} (exit {verdict.exit_code})", "",
             f"baseline `{verdict.baseline}`, results `{verdict.results_dir}`: {summary_line(verdict)}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for c in _order(verdict):
        cells = [esc(x) for x in _cells(c)]
        if c.status in verdict.failing:
            cells[COLUMNS.index("status")] = f"**{cells[COLUMNS.index('status')]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _json_num(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def to_json(verdict: Verdict) -> dict:
    checks = [
        {**dict(zip(KEY, map(str, c.key))), "baseline": _json_num(c.baseline), "current": _json_num(c.current),
         "tolerance": _json_num(c.tolerance), "allowed": _json_num(c.allowed), "threshold": _json_num(c.threshold),
         "status": c.status, "reason": c.reason, "failing": c.status in verdict.failing}
        for c in _order(verdict)
    ]
    summary = {"verdict": verdict.verdict, "exit_code": verdict.exit_code, "compared": verdict.compared,
               "failing": sum(c["failing"] for c in checks), "counts": verdict.counts}
    return {"baseline": verdict.baseline, "results_dir": verdict.results_dir, "checks": checks, "summary": summary}


def junit(verdict: Verdict) -> ET.ElementTree:
    """One testcase per gated metric: a <failure> for failing ones, <skipped> for those not compared."""
    suite = ET.Element("testsuite", name="harness gate")
    props = ET.SubElement(suite, "properties")
    for name, value in (("baseline", verdict.baseline), ("results_dir", verdict.results_dir),
                        ("exit_code", str(verdict.exit_code)), ("verdict", verdict.verdict)):
        ET.SubElement(props, "property", name=name, value=value)
    failures = skipped = 0
    for c in _order(verdict):
        model, weights, task, subtask, metric = map(str, c.key)
        name = f"{subtask}/{metric}@{weights}" if subtask else f"{metric}@{weights}"
        case = ET.SubElement(suite, "testcase", classname=f"gate.{task}.{model}", name=name, time="0")
        detail = (f"baseline={_num(c.baseline)} value={_num(c.current)} tolerance={_num(c.tolerance, '.3g')} "
                  f"allowed={_num(c.allowed, '.3g')}" + (f" threshold={c.threshold:.3g}" if c.threshold else ""))
        if c.status in verdict.failing:
            failures += 1
            el = ET.SubElement(case, "failure", type=c.status, message=f"{c.status}: {c.reason or detail}")
            el.set("baseline", _num(c.baseline))
            el.set("value", _num(c.current))
            el.set("tolerance", _num(c.tolerance, ".3g"))
            el.set("allowed", _num(c.allowed, ".3g"))
            el.text = f"{detail}\n{c.reason}".strip()
        elif c.status not in COMPARED:
            skipped += 1
            ET.SubElement(case, "skipped", message=f"{c.status}: {c.reason}" if c.reason else c.status)
        else:
            ET.SubElement(case, "system-out").text = f"{c.status}: {detail}"
    if verdict.exit_code == EXIT_NOT_COMPARED and failures == 0:
        failures += 1  # nothing compared is not a pass: give the report one failing case to show it
        case = ET.SubElement(suite, "testcase", classname="gate", name="compared", time="0")
        ET.SubElement(case, "failure", type="NOT COMPARED", message=verdict.verdict).text = summary_line(verdict)
    n = len(suite.findall("testcase"))
    for el in (suite,):
        el.set("tests", str(n))
        el.set("failures", str(failures))
        el.set("errors", "0")
        el.set("skipped", str(skipped))
    root = ET.Element("testsuites", name="harness gate", tests=str(n), failures=str(failures), errors="0",
                      skipped=str(skipped))
    root.append(suite)
    ET.indent(root)
    return ET.ElementTree(root)


def check_output_path(path: str | None, flag: str) -> None:
    """Refuse an output path that can never be written, before any work is done."""
    if path and Path(path).is_dir():
        raise HarnessError(f"{flag} '{path}' is a directory; give a file path")


def write_outputs(verdict: Verdict, junit_path: str | None = None, json_path: str | None = None,
                  step_summary: str | None = None) -> list[Path]:
    """Write the requested reports (parents created); `step_summary` is appended to, as GitHub Actions expects."""
    written = []
    try:
        if junit_path:
            p = Path(junit_path)
            p.parent.mkdir(parents=True, exist_ok=True)
            junit(verdict).write(p, encoding="utf-8", xml_declaration=True)
            written.append(p)
        if json_path:
            p = Path(json_path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(to_json(verdict), indent=2) + "\n", encoding="utf-8")
            written.append(p)
        if step_summary:
            p = Path(step_summary)
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "a", encoding="utf-8") as f:
                f.write(markdown(verdict) + "\n")
            written.append(p)
    except OSError as e:
        raise HarnessError(f"cannot write gate report '{e.filename}': {e.strerror}") from e
    return written


def step_summary_path() -> str | None:
    return os.environ.get("GITHUB_STEP_SUMMARY") or None
