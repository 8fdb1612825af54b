"""`harness run --resume` (issue 14): after a kill -9 or a Ctrl-C at any point, the same command with
`--resume` ends with exactly the rows of an uninterrupted run, value for value, none written twice.

The run: the tiny GPT-2 pair on `ppl` (a short text file), GLUE (two subtasks, which resume one by one)
and, in the kill -9 subprocess, `parity`; for subtask granularity of a ladder task, `ngram-rules` (two
orders) on two n-gram models. Kills land at seeded random points counted in writes (a row, or a
"finished" marker), so they fall mid-unit, mid-subtask, between a unit's last row and its marker, and between units.
The default suite kills in-process (Ctrl-C, a torn last line) and once with kill -9 in a subprocess;
`-m slow` runs the 10 seeded kill -9 points.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.api import ResultStore, RunJournal, read_jsonl
from harness.cli import main
from harness.runner import RunPlan, run

TEXT = "The quick brown fox jumps over the lazy dog. " * 6 + "\nA second line, for a second sentence.\n"
GLUE = {"subtasks": "sst2,stsb", "max_train_examples": "6", "max_eval_examples": "6", "batch_size": "3",
        "eval_batch_size": "3", "max_seq_len": "16", "bootstrap": "10"}
NGRAM = {"n": "2,3", "train_samples": "60", "samples": "20", "eval_samples": "20", "steps": "8", "batch_size": "8"}
TIMINGS = ("seconds", "tokens_per_s")  # wall-clock metrics: measured again on resume, not comparable


def _sets(overrides: dict[str, dict[str, str]]) -> list[str]:
    return [arg for task, kv in overrides.items() for k, v in kv.items() for arg in ("--set", f"{task}.{k}={v}")]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "doc.txt"
    path.write_text(TEXT)
    return str(path)


def gpt2_plan(text_file: str, results: Path) -> RunPlan:
    return RunPlan(models=["gpt2-scratch", "gpt2-hf"], tasks=["ppl", "glue"], weights="random:tiny",
                   results_dir=str(results), overrides={"ppl": {"file": text_file}, "glue": GLUE})


def ngram_plan(results: Path) -> RunPlan:
    return RunPlan(models=["bigram", "trigram"], tasks=["ngram-rules"], results_dir=str(results),
                   overrides={"ngram-rules": NGRAM})


def rows_of(results: Path) -> list[dict]:
    return [r for f in sorted(results.glob("v*/*.jsonl")) for r in read_jsonl(f)]


def comparable(rows: list[dict]) -> list[tuple]:
    """Rows as sorted (key, values) without what differs between two honest runs: run ids, dates, timings."""
    def value(x):
        return "nan" if isinstance(x, float) and math.isnan(x) else x

    out = [((r["model"], r["task"], r["subtask"], r["metric"]),
            (value(r["value"]), r["n"], value(r["stderr"]), json.dumps(r["config"], sort_keys=True),
             r["weights_sha256"], r["task_version"], r["seed"]))
           for r in rows if not any(t in r["metric"] for t in TIMINGS)]
    return sorted(out, key=lambda kv: kv[0])


def assert_same_rows(resumed: list[dict], clean: list[dict]) -> None:
    keys = [(r["model"], r["task"], r["subtask"], r["metric"]) for r in resumed]
    assert len(keys) == len(set(keys)), "a row was written twice"
    assert sorted(keys) == sorted((r["model"], r["task"], r["subtask"], r["metric"]) for r in clean)
    assert comparable(resumed) == comparable(clean)
    assert len({r["run_id"] for r in resumed}) == 1  # the resumed rows continue the run, in its file


# --- in-process: Ctrl-C (KeyboardInterrupt) at the k-th write, and a line torn in half ---

class Interrupt:
    """Raise KeyboardInterrupt at the k-th write (a row or a finished marker), before it is made;
    with `torn`, half of the k-th row is written first (a kill in the middle of a write)."""

    def __init__(self, monkeypatch, k: int, torn: bool = False) -> None:
        self.k, self.torn, self.count = k, torn, 0
        append, finish = ResultStore.append, RunJournal.finish

        def counted_append(store, row):
            self._tick(store.path if torn else None)
            append(store, row)

        def counted_finish(journal, *args, **kwargs):
            self._tick(None)
            finish(journal, *args, **kwargs)

        monkeypatch.setattr(ResultStore, "append", counted_append)
        monkeypatch.setattr(RunJournal, "finish", counted_finish)

    def _tick(self, path: Path | None) -> None:
        self.count += 1
        if self.count == self.k:
            if path is not None:
                with open(path, "a") as f:
                    f.write('{"model": "gpt2-scratch", "task": "pp')
            raise KeyboardInterrupt


def writes(results: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in results.glob("v*/*") if p.suffix in (".jsonl", ".units"))


@pytest.fixture(scope="module")
def clean_gpt2(text_file, tmp_path_factory):
    results = tmp_path_factory.mktemp("clean")
    _, failures = run(gpt2_plan(text_file, results))
    assert failures == []
    return rows_of(results), writes(results)


def _interrupted_then_resumed(plan: RunPlan, k: int, monkeypatch, torn: bool = False) -> list[dict]:
    with monkeypatch.context() as patch:
        Interrupt(patch, k, torn)
        with pytest.raises(KeyboardInterrupt):
            run(plan)
    plan.resume = True
    _, failures = run(plan)
    assert failures == []
    return rows_of(Path(plan.results_dir))


@pytest.mark.parametrize("point", [0.6, pytest.param(0.3, marks=pytest.mark.slow)])
def test_ctrl_c_then_resume_gives_the_clean_rows(point, clean_gpt2, text_file, tmp_path, monkeypatch):
    clean, n_writes = clean_gpt2
    k = max(1, int(point * n_writes))
    assert_same_rows(_interrupted_then_resumed(gpt2_plan(text_file, tmp_path), k, monkeypatch), clean)


def test_a_row_torn_by_a_kill_is_dropped_and_redone(clean_gpt2, text_file, tmp_path, monkeypatch):
    clean, _ = clean_gpt2
    assert_same_rows(_interrupted_then_resumed(gpt2_plan(text_file, tmp_path), 2, monkeypatch, torn=True), clean)


def test_finished_units_and_subtasks_are_not_recomputed(clean_gpt2, text_file, tmp_path, monkeypatch):
    """Killed inside GLUE's second subtask on gpt2-scratch: the resume does not run ppl or glue sst2 of
    that model again (their rows stay as written), drops stsb's half and redoes it, then runs gpt2-hf.
    Writes: ppl 4 rows + marker (5), sst2 2 rows + marker (8), stsb pearson (9)."""
    clean, _ = clean_gpt2
    plan = gpt2_plan(text_file, tmp_path)
    with monkeypatch.context() as patch:
        Interrupt(patch, 10)  # before stsb's spearmanr
        with pytest.raises(KeyboardInterrupt):
            run(plan)
    before = {(r["model"], r["task"], r["subtask"], r["metric"]): r["created_at"] for r in rows_of(tmp_path)}
    assert ("gpt2-scratch", "glue", "sst2", "accuracy") in before and ("gpt2-scratch", "glue", "stsb", "pearson") \
        in before and ("gpt2-scratch", "glue", "stsb", "spearmanr") not in before
    plan.resume = True
    redone = []
    original = ResultStore.append

    def recording(store, row):
        redone.append((row.model, row.task, row.subtask))
        original(store, row)

    monkeypatch.setattr(ResultStore, "append", recording)
    run(plan)
    assert {("gpt2-scratch", "ppl", ""), ("gpt2-scratch", "glue", "sst2")}.isdisjoint(redone)
    assert ("gpt2-scratch", "glue", "stsb") in redone and ("gpt2-hf", "ppl", "") in redone
    after = {(r["model"], r["task"], r["subtask"], r["metric"]): r["created_at"] for r in rows_of(tmp_path)}
    assert all(after[key] == stamp for key, stamp in before.items() if key[2] != "stsb")
    assert_same_rows(rows_of(tmp_path), clean)


def test_ngram_rules_resumes_order_by_order(tmp_path, monkeypatch):
    clean_dir = tmp_path / "clean"
    run(ngram_plan(clean_dir))
    clean = rows_of(clean_dir)
    k = 7  # bigram n=2: 5 rows + its marker; killed at n=3's first row
    assert_same_rows(_interrupted_then_resumed(ngram_plan(tmp_path / "resumed"), k, monkeypatch), clean)


# --- refusals: one line, exit 2, nothing written ---

def _one_line_exit_2(capsys, argv: list[str], words: list[str]) -> None:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_resume_with_no_run_is_refused(tmp_path, capsys):
    argv = ["run", "--model", "gpt2-scratch", "--tasks", "ppl", "--results-dir", str(tmp_path), "--resume"]
    _one_line_exit_2(capsys, argv, ["--resume: no run to resume in", "without --resume"])


RESUMABLE = ["run", "--model", "gpt2-scratch", "--tasks", "ppl", "--weights", "random:tiny", "--limit", "2"]


@pytest.mark.parametrize("change, words", [
    ({"--seed": "1"}, ["seed was 0, now 1"]),
    ({"--limit": "3"}, ["limit was 2, now 3"]),
    ({"--weights": "random:gpt2"}, ['weights was "random:tiny", now "random:gpt2"']),
    ({"--set": "ppl.stride=64"}, ["configs.ppl.stride was null, now 64"]),
    ({"--tasks": "ppl,parity"}, ['tasks was ["ppl"], now ["ppl", "parity"]']),
], ids=["seed", "limit", "weights", "task-config", "tasks"])
def test_resume_of_another_plan_is_refused_naming_the_field(change, words, tmp_path, capsys, monkeypatch):
    """Refused before any weights load, and the earlier run's files are left as they are."""
    from harness.runner import plan_record, validate

    earlier = RunPlan(models=["gpt2-scratch"], tasks=["ppl"], weights="random:tiny", limit=2)
    (tmp_path / "v1").mkdir()
    plan_file = tmp_path / "v1" / "20260101T000000Z-abcdef.plan.json"
    plan_file.write_text(json.dumps(plan_record(earlier, validate(earlier))))
    monkeypatch.setattr("harness.runner.load_weights", lambda *a, **k: pytest.fail("weights loaded before the check"))
    argv = list(RESUMABLE)
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    _one_line_exit_2(capsys, [*argv, "--results-dir", str(tmp_path), "--resume"],
                     ["the newest run in", "20260101T000000Z-abcdef", *words])
    assert [p.name for p in (tmp_path / "v1").iterdir()] == [plan_file.name]


def test_resume_refuses_other_weights(tmp_path, capsys):
    """Same plan, but the weights behind the same --weights changed (e.g. retrained into the same dir)."""
    results = tmp_path / "r"
    argv = ["run", "--model", "gpt2-scratch", "--tasks", "ppl", "--weights", "random:tiny", "--set",
            f"ppl.file={tmp_path / 'doc.txt'}", "--results-dir", str(results)]
    (tmp_path / "doc.txt").write_text(TEXT)
    assert main(argv) == 0
    plan_file = next(results.glob("v1/*.plan.json"))
    plan = json.loads(plan_file.read_text())
    plan["weights_sha256"]["gpt2-scratch"] = "0" * 64
    plan_file.write_text(json.dumps(plan))
    capsys.readouterr()
    _one_line_exit_2(capsys, [*argv, "--resume"], ["weights_sha256.gpt2-scratch was"])


# --- kill -9 in a subprocess ---

def _cli_args(text_file: str, results: Path) -> list[str]:
    return [sys.executable, "-m", "harness", "run", "--model", "gpt2-scratch,gpt2-hf", "--tasks", "ppl,parity,glue",
            "--weights", "random:tiny", "--results-dir", str(results),
            *_sets({"ppl": {"file": text_file}, "glue": GLUE})]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _kill_at(args: list[str], results: Path, k: int, timeout: float = 300) -> None:
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if results.exists() and writes(results) >= k:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()


@pytest.fixture(scope="module")
def clean_cli(text_file, tmp_path_factory):
    results = tmp_path_factory.mktemp("clean-cli")
    done = subprocess.run(_cli_args(text_file, results), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return rows_of(results), writes(results)


def _kill_and_resume(k: int, text_file: str, results: Path, clean: list[dict]) -> None:
    args = _cli_args(text_file, results)
    _kill_at(args, results, k)
    done = subprocess.run([*args, "--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert_same_rows(rows_of(results), clean)


def test_kill_9_then_resume_gives_the_clean_rows(clean_cli, text_file, tmp_path):
    clean, n_writes = clean_cli
    _kill_and_resume(n_writes // 2, text_file, tmp_path, clean)


@pytest.mark.slow
@pytest.mark.parametrize("draw", range(10))
def test_kill_9_at_ten_seeded_points(draw, clean_cli, text_file, tmp_path):
    clean, n_writes = clean_cli
    points = random.Random(14).sample(range(1, n_writes), min(10, n_writes - 1))
    _kill_and_resume(points[draw % len(points)], text_file, tmp_path, clean)


def test_a_task_measuring_the_reference_redoes_both_units(tmp_path):
    """throughput measures gpt2-hf inside gpt2-scratch's unit and hands its rows over: killed after
    gpt2-scratch's unit but before gpt2-hf's, the resume must redo both (else gpt2-hf's rows are lost)."""
    from harness.api import TASKS, make_config
    from harness.runner import _redo_with_reference

    throughput = TASKS.get("throughput")
    tasks = {"throughput": throughput(make_config(throughput, {}))}
    store = ResultStore(tmp_path)
    rows = [json.dumps({"model": "gpt2-scratch", "task": "throughput", "subtask": f"s{i}", "metric": "m",
                        "value": i, "created_at": "x"}) for i in range(3)]
    store.path.parent.mkdir(parents=True)
    store.path.write_text("".join(r + "\n" for r in rows))
    journal = RunJournal(store, {}, [{"model": "gpt2-scratch", "task": "throughput", "subtask": None, "rows": 3}])
    models = ["gpt2-scratch", "gpt2-hf"]
    redo = _redo_with_reference(journal, models, tasks)
    assert redo == {("gpt2-scratch", "throughput")}
    journal.forget(redo)
    assert journal.prune() == 3 and store.path.read_text() == "" and not journal.is_complete(*next(iter(redo)))
    journal.finish("gpt2-scratch", "throughput")
    journal.finish("gpt2-hf", "throughput")
    assert _redo_with_reference(journal, models, tasks) == set()
