"""Defaults that leave committed files alone, and quiet libraries (issue 14): a plain `harness run` and
`harness report` write under `runs/` (git-ignored), never to `results/` or `reports/report.md`; no
"Loading weights" bar from transformers on any command; rich progress is not wrapped at 80 columns
off a terminal."""

import os
import subprocess
import sys
from pathlib import Path

from harness.api import DEFAULT_REPORT, DEFAULT_RESULTS_DIR
from harness.cli import QUIET_LIBRARIES, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_the_defaults_are_git_ignored():
    paths = [f"{DEFAULT_RESULTS_DIR}/v1/x.jsonl", DEFAULT_REPORT, str(Path(DEFAULT_REPORT).parent / "figures/a.png")]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == paths


def test_every_command_defaults_to_the_same_place():
    parser = build_parser()
    assert parser.parse_args(["run", "--model", "m", "--tasks", "t"]).results_dir == DEFAULT_RESULTS_DIR
    assert parser.parse_args(["gate", "--baseline", "b"]).results_dir == DEFAULT_RESULTS_DIR
    assert parser.parse_args(["report"]).out == DEFAULT_REPORT
    from harness.train.config import TrainRun

    assert TrainRun(model="gpt2-scratch", data="tinyshakespeare", out="x").results_dir == DEFAULT_RESULTS_DIR


def test_plain_run_and_report_write_under_runs_without_library_bars(tmp_path, monkeypatch):
    """The README's command 1 shape (default weights, so transformers' from_pretrained loads them), in a
    fresh working directory: rows under runs/results, the report at runs/report/report.md, no bars."""
    (tmp_path / "doc.txt").write_text("The quick brown fox jumps over the lazy dog. " * 4)
    env = {k: v for k, v in os.environ.items() if k not in QUIET_LIBRARIES and k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "harness", "run", "--model", "gpt2-scratch", "--tasks", "ppl",
                           "--set", "ppl.file=doc.txt"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Loading weights" not in done.stderr + done.stdout and "it/s]" not in done.stderr
    rows = list((tmp_path / DEFAULT_RESULTS_DIR).glob("v1/*.jsonl"))
    assert len(rows) == 1 and f"4 rows -> {DEFAULT_RESULTS_DIR}/v1/" in done.stdout
    assert "ppl gpt2-scratch ━" in done.stderr  # our progress, one line per bar
    assert all(len(line) <= 200 for line in done.stderr.splitlines())
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 0
    assert (tmp_path / DEFAULT_REPORT).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.txt", "runs"]
