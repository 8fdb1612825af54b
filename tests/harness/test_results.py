import json
import subprocess
import sys
import textwrap

import pytest

from harness.api import SCHEMA_VERSION, HarnessError, ResultStore, latest, load_results, read_jsonl

REQUIRED = {
    "model",
    "weights",
    "weights_sha256",
    "task",
    "task_version",
    "subtask",
    "metric",
    "value",
    "n",
    "stderr",
    "higher_is_better",
    "config",
    "seed",
    "run_id",
    "created_at",
    "git_sha",
    "git_dirty",
    "harness_version",
    "torch_version",
    "transformers_version",
    "device",
    "wall_seconds",
    "schema_version",
}


def test_rows_carry_every_required_field(tiny_run):
    rows = read_jsonl(tiny_run.path)
    assert rows, "the run wrote no rows"
    for row in rows:
        assert REQUIRED <= set(row), REQUIRED - set(row)
        assert row["schema_version"] == SCHEMA_VERSION
        assert len(row["weights_sha256"]) == 64
    assert tiny_run.path.parent.name == f"v{SCHEMA_VERSION}"


def test_loader_joins_dirs_and_latest_picks_newest(tiny_run, tmp_path):
    old = dict(read_jsonl(tiny_run.path)[0], value=123.0, created_at="2000-01-01T00:00:00+00:00", run_id="old")
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "old.jsonl").write_text(json.dumps(old) + "\n")
    df = load_results(tiny_run.path.parent.parent, tmp_path)
    assert len(df) == len(tiny_run.rows) + 1
    newest = latest(df)
    same = newest[(newest.model == old["model"]) & (newest.metric == old["metric"])]
    assert len(same) == 1 and same.iloc[0]["value"] != 123.0


def test_old_schema_rows_stay_readable(tmp_path):
    legacy = {
        "model": "m",
        "weights": "w",
        "task": "t",
        "subtask": "",
        "metric": "x",
        "value": "nan",
        "created_at": "2020-01-01T00:00:00+00:00",
    }
    (tmp_path / "legacy.jsonl").write_text(json.dumps(legacy) + "\n")
    df = load_results(tmp_path)
    assert df.iloc[0]["schema_version"] == 1 and df.iloc[0]["value"] != df.iloc[0]["value"]  # NaN


def test_malformed_results_file_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(HarnessError, match=r"bad.jsonl:2"):
        load_results(tmp_path)


def test_a_killed_process_keeps_the_rows_it_wrote(tmp_path):
    script = textwrap.dedent(f"""
        import os
        from harness.api import ResultRow, ResultStore
        store = ResultStore({str(tmp_path)!r}, run_id="killed")
        for i in range(3):
            store.append(ResultRow(model="m", weights="w", weights_sha256="0" * 64, task="t", task_version="1",
                subtask="", metric=f"m{{i}}", value=float(i), n=1, stderr=None, higher_is_better=True, config={{}},
                seed=0, run_id="killed", created_at="2026-01-01T00:00:00+00:00", git_sha="x", git_dirty=False,
                harness_version="0", torch_version="0", transformers_version="0", device="cpu", wall_seconds=0.0))
        os._exit(9)  # dies without any cleanup, as a SIGKILL would
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    rows = read_jsonl(tmp_path / f"v{SCHEMA_VERSION}" / "killed.jsonl")
    assert [r["metric"] for r in rows] == ["m0", "m1", "m2"]


def test_store_refuses_an_unwritable_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(HarnessError, match="cannot create results dir"):
        ResultStore(blocker / "sub")
