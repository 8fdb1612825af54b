"""Result rows: what a task yields (`Metric`), what is stored (`ResultRow`, with provenance), and the
one `make_row` that turns the first into the second for every command (`run`, `train`, ...).
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Metric:
    """What a task yields: one number with its meaning. The runner adds provenance."""

    metric: str
    value: float
    higher_is_better: bool | None
    subtask: str = ""
    n: int | None = None
    stderr: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. CI bounds, per-step index, units


@dataclass
class ResultRow:
    model: str
    weights: str
    weights_sha256: str
    task: str
    task_version: str
    subtask: str
    metric: str
    value: float
    n: int | None
    stderr: float | None
    higher_is_better: bool | None
    config: dict[str, Any]
    seed: int
    run_id: str
    created_at: str
    git_sha: str
    git_dirty: bool
    harness_version: str
    torch_version: str
    transformers_version: str
    device: str
    wall_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    model_sha256: str | None = None  # SHA-256 of a user's model file (`--model PATH.py:NAME`); None otherwise


def new_run_id() -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Versions and git state, computed once per process."""
    import torch
    import transformers

    from harness import __version__

    sha, dirty = _git_state()
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "harness_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
    }


def _git_state() -> tuple[str, bool]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        sha = git("rev-parse", "HEAD") or "unknown"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return sha, dirty




def make_row(
    metric: Metric, *, model: str, weights: Any, task: str, task_version: str, config: dict[str, Any], seed: int,
    run_id: str, device: str, wall_seconds: float, model_sha256: str | None = None,
) -> ResultRow:
    """One stored row: the metric, what produced it (`weights` is a `harness.api.Weights`) and provenance."""
    prov = provenance()
    return ResultRow(
        model=model, weights=weights.identity, weights_sha256=weights.sha256, task=task, task_version=task_version,
        subtask=metric.subtask, metric=metric.metric, value=metric.value, n=metric.n, stderr=metric.stderr,
        higher_is_better=metric.higher_is_better, config=config, seed=seed, run_id=run_id, created_at=now_iso(),
        git_sha=prov["git_sha"], git_dirty=prov["git_dirty"], harness_version=prov["harness_version"],
        torch_version=prov["torch_version"], transformers_version=prov["transformers_version"], device=device,
        wall_seconds=round(wall_seconds, 3), extra=metric.extra, model_sha256=model_sha256,
    )
