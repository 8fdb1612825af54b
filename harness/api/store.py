"""Versioned, append-only result rows (JSON Lines) and a pandas loader.

Layout: ``<results-dir>/v<SCHEMA_VERSION>/<run_id>.jsonl``, one JSON object per
metric. Each row is written, flushed and fsync'ed as soon as it is computed,
so a crash or a kill loses none of the rows already written. Rows also carry
``schema_version``; `load_results` upgrades older schemas when they exist.

`harness run` also keeps two sidecars per run for `--resume` (`RunJournal`): ``<run_id>.plan.json``
(what the run computes) and ``<run_id>.units`` (one line per finished subtask or (model, task)).
Neither ends in ``.jsonl``, so no reader of rows ever sees them.

Defaults write where git does not look (``/runs/`` is in .gitignore): committed rows under
``results/`` and the committed ``reports/report.md`` change only when named with ``--results-dir`` /
``--out``.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api.errors import HarnessError
from harness.api.rows import SCHEMA_VERSION, ResultRow, new_run_id

if TYPE_CHECKING:  # pandas is imported where rows are loaded, so that the CLI's defaults cost nothing
    import pandas as pd

DEFAULT_RESULTS_DIR = "runs/results"  # where run, train, gate and report read and write rows by default
DEFAULT_REPORT = "runs/report/report.md"  # where a plain `harness report` writes


class ResultStore:
    """Appends rows of one run to ``<dir>/v<schema>/<run_id>.jsonl``."""

    def __init__(self, results_dir: str | Path, run_id: str | None = None) -> None:
        self.run_id = run_id or new_run_id()
        self.path = Path(results_dir) / f"v{SCHEMA_VERSION}" / f"{self.run_id}.jsonl"
        _check_creatable(self.path.parent)  # now, before any work; the folder itself comes with the first write
        self.rows: list[ResultRow] = []
        self.counts: Counter[tuple[str, str]] = Counter()  # rows written per (model, task), for RunJournal

    def append(self, row: ResultRow) -> None:
        line = json.dumps(_jsonable(asdict(row)), sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.counts[(row.model, row.task)] += 1


def _check_creatable(folder: Path) -> None:
    """Refuse, in one line, a results dir that cannot be created or written, without creating it."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise HarnessError(f"cannot create results dir '{folder}': '{existing}' is a file; name another --results-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HarnessError(f"cannot create results dir '{folder}': '{existing}' is not writable; "
                           "name another --results-dir")


def check_output_file(path: str | Path | None, flag: str) -> None:
    """Refuse, in one line and before any work, an output file that could never be written: a
    directory, or one under a file or under a folder that is not writable."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise HarnessError(f"{flag} '{path}' is a directory; give a file path")
    existing = p.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise HarnessError(f"{flag} '{path}': '{existing}' is a file, not a folder; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HarnessError(f"{flag} '{path}': '{existing}' is not writable; give another path")


def _jsonable(obj: Any) -> Any:
    """JSON has no NaN/inf: store them as strings so that files stay strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _upgrade(row: dict[str, Any]) -> dict[str, Any]:
    """Bring a row of any earlier schema up to the current one (schema 1 is the first)."""
    row.setdefault("schema_version", 1)
    row.setdefault("extra", {})
    for key in ("value", "stderr"):
        if isinstance(row.get(key), str):
            row[key] = float(row[key])
    return row


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(_upgrade(json.loads(line)))
            except json.JSONDecodeError as e:
                raise HarnessError(f"{path}:{lineno}: not a JSON object ({e.msg})") from e
    return rows


def result_files(location: str | Path) -> list[Path]:
    """Every .jsonl under `location`, recursively. Folders named `baseline` hold CI's reference rows,
    not runs: they are read only when named directly (e.g. `harness gate --baseline results/baseline`)."""
    p = Path(location)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise HarnessError(f"results location '{p}' does not exist")
    return sorted(f for f in p.rglob("*.jsonl") if "baseline" not in f.relative_to(p).parts[:-1])


def load_results(*locations: str | Path) -> pd.DataFrame:
    """All rows under the given results dirs (or files) as one DataFrame, oldest first."""
    import pandas as pd

    rows = [row for loc in locations for f in result_files(loc) for row in read_jsonl(f)]
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("created_at", kind="stable").reset_index(drop=True)
    return df


def latest(df: pd.DataFrame, keys: tuple[str, ...] = ("model", "weights", "task", "subtask", "metric")) -> pd.DataFrame:
    """The newest row for each key (by created_at, then file order)."""
    if df.empty:
        return df
    return df.groupby(list(keys), sort=True, dropna=False).tail(1).reset_index(drop=True)


# --- `harness run --resume` -------------------------------------------------------------------------

Unit = tuple[str, str]  # (model, task)


class RunJournal:
    """The rows of one `harness run` and what of its plan is finished, so that `--resume` can continue it.

    `<run_id>.plan.json` holds the plan (models, tasks, weights and their SHA-256, limit, seed, device,
    every task's version and resolved config); `<run_id>.units` gets one fsync'ed JSON line when a
    subtask or a whole (model, task) unit has written all its rows, with the count of the unit's rows
    written by then. On resume, the rows of a unit cut short beyond its last finished subtask are
    dropped by rewriting the rows file atomically (readers see the old file or the new one, never a
    duplicate), and the runner redoes the rest."""

    def __init__(self, store: ResultStore, plan: dict[str, Any], markers: list[dict[str, Any]] | None = None) -> None:
        self.store, self.plan = store, plan
        self.units_path = store.path.with_name(f"{store.run_id}.units")
        self.markers: list[dict[str, Any]] = list(markers or [])
        self.dropped = 0  # rows of units cut short that `prune` removed

    @classmethod
    def start(cls, store: ResultStore, plan: dict[str, Any]) -> RunJournal:
        _write_atomic(plan_path(store), json.dumps(_jsonable(plan), sort_keys=True, indent=1, default=str) + "\n")
        return cls(store, plan)

    @classmethod
    def reopen(cls, store: ResultStore, plan: dict[str, Any]) -> RunJournal:
        """The journal of an earlier run with this plan (checked again: now with the weights' SHA-256)."""
        check_same_plan(store.path.parent.parent, store.run_id, plan)
        markers = [json.loads(line) for line in _complete_lines(store.path.with_name(f"{store.run_id}.units"))]
        return cls(store, plan, markers)

    def is_complete(self, model: str, task: str) -> bool:
        return any(m["subtask"] is None and (m["model"], m["task"]) == (model, task) for m in self.markers)

    def subtask_done(self, model: str, task: str, subtask: str) -> bool:
        return any((m["model"], m["task"], m["subtask"]) == (model, task, subtask) for m in self.markers)

    def finish(self, model: str, task: str, subtask: str | None = None) -> None:
        """Every row of `subtask` (None: of the whole unit) is written."""
        marker = {"model": model, "task": task, "subtask": subtask, "rows": self.store.counts[(model, task)]}
        with open(self.units_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(marker, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.markers.append(marker)

    def forget(self, units: set[Unit]) -> None:
        """Mark finished units as not started (their rows go at `prune`): for units redone together."""
        if units:
            self.markers = [m for m in self.markers if (m["model"], m["task"]) not in units]
            _write_atomic(self.units_path, "".join(json.dumps(m, sort_keys=True) + "\n" for m in self.markers))

    def prune(self) -> int:
        """Keep the rows of finished units and of finished subtasks; drop the rest (rows of a unit cut
        short) in one atomic rewrite. Loads the kept rows into the store; returns how many were dropped."""
        keep_counts: dict[Unit, float] = {}
        for m in self.markers:
            unit = (m["model"], m["task"])
            keep_counts[unit] = float("inf") if m["subtask"] is None else max(keep_counts.get(unit, 0), m["rows"])
        seen: Counter[Unit] = Counter()
        kept, dropped = [], 0
        lines = _complete_lines(self.store.path)
        for lineno, line in enumerate(lines, 1):
            row = _parse_row(line, self.store.path, lineno)
            unit = (row["model"], row["task"])
            seen[unit] += 1
            if seen[unit] <= keep_counts.get(unit, 0):
                kept.append((line, row))
            else:
                dropped += 1
        if dropped or (self.store.path.exists() and len(lines) != _line_count(self.store.path)):
            _write_atomic(self.store.path, "".join(line + "\n" for line, _ in kept))
        self.store.rows = [_to_row(row) for _, row in kept]
        self.store.counts = Counter((r.model, r.task) for r in self.store.rows)
        self.dropped = dropped
        return dropped


def plan_path(store: ResultStore) -> Path:
    return store.path.with_name(f"{store.run_id}.plan.json")


def newest_run(results_dir: str | Path) -> str:
    """The run id of the newest `harness run` (one with a plan) in `results_dir`."""
    folder = Path(results_dir) / f"v{SCHEMA_VERSION}"
    plans = sorted(folder.glob("*.plan.json"), key=lambda p: (p.name.split("-")[0], p.stat().st_mtime_ns))
    if not plans:
        raise HarnessError(f"--resume: no run to resume in '{results_dir}' (no {folder.name}/*.plan.json); "
                           "run the command without --resume first, or name its --results-dir")
    return plans[-1].name.removesuffix(".plan.json")


def check_same_plan(results_dir: str | Path, run_id: str, plan: dict[str, Any]) -> None:
    """Refuse, in one line naming the first field that differs, to resume a run of another plan."""
    path = Path(results_dir) / f"v{SCHEMA_VERSION}" / f"{run_id}.plan.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise HarnessError(f"--resume: cannot read the plan of run {run_id} ({path}): {e}; "
                           "rerun without --resume") from e
    new = json.loads(json.dumps(_jsonable(plan), default=str))
    for key in new:
        if key in old and old[key] != new[key]:
            raise HarnessError(f"--resume: the newest run in '{results_dir}' ({run_id}) has another plan: "
                               f"{_difference(key, old[key], new[key])}; rerun without --resume for a new run")


def _difference(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return _difference(f"{key}.{k}", old.get(k), new.get(k))
    return f"{key} was {json.dumps(old)}, now {json.dumps(new)}"


def _complete_lines(path: Path) -> list[str]:
    """The file's lines, without a last one cut short by a kill (no newline) and without blank ones."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [line for line in text.splitlines() if line.strip()]


def _line_count(path: Path) -> int:
    return len([line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()])


def _parse_row(line: str, path: Path, lineno: int) -> dict[str, Any]:
    try:
        return _upgrade(json.loads(line))
    except json.JSONDecodeError as e:
        raise HarnessError(f"--resume: {path}:{lineno} is not a JSON object ({e.msg}); rerun without --resume") from e


def _to_row(row: dict[str, Any]) -> ResultRow:
    return ResultRow(**{f.name: row[f.name] for f in fields(ResultRow) if f.name in row})


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling (not *.jsonl), fsync it, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
