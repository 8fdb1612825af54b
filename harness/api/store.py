"""Versioned, append-only result rows (JSON Lines) and a pandas loader.

Layout: ``<results-dir>/v<SCHEMA_VERSION>/<run_id>.jsonl``, one JSON object per
metric. Each row is written, flushed and fsync'ed as soon as it is computed,
so a crash or a kill loses none of the rows already written. Rows also carry
``schema_version``; `load_results` upgrades older schemas when they exist.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from harness.api.errors import HarnessError
from harness.api.rows import SCHEMA_VERSION, ResultRow, new_run_id


class ResultStore:
    """Appends rows of one run to ``<dir>/v<schema>/<run_id>.jsonl``."""

    def __init__(self, results_dir: str | Path, run_id: str | None = None) -> None:
        self.run_id = run_id or new_run_id()
        self.path = Path(results_dir) / f"v{SCHEMA_VERSION}" / f"{self.run_id}.jsonl"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HarnessError(f"cannot create results dir '{self.path.parent}': {e.strerror}") from e
        self.rows: list[ResultRow] = []

    def append(self, row: ResultRow) -> None:
        line = json.dumps(_jsonable(asdict(row)), sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)


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
