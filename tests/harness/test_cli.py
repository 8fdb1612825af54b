"""The command line as a user meets it: exit codes, one-line errors, report and gate."""

import json
import shutil
import subprocess
import sys

import pytest

from harness.cli import main


def harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=600)


def test_list_models_and_tasks(capsys):
    assert main(["list", "models"]) == 0
    assert "gpt2-scratch" in capsys.readouterr().out
    assert main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    assert "ppl" in out and "parity" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--model", "gpt5-scratch", "--tasks", "ppl"], "unknown model 'gpt5-scratch'; known models: "),
        (["run", "--model", "gpt2-scratch", "--tasks", "mmlu"], "unknown task 'mmlu'; known tasks: "),
        (["run", "--model", "gpt2-scratch", "--tasks", "ppl", "--set", "ppl.window=3"], "unknown key 'ppl.window'"),
        (["run", "--model", "gpt2-scratch", "--tasks", "ppl", "--set", "ppl.stride=abc"], "expected int"),
        (["run", "--model", "gpt2-scratch", "--tasks", "ppl", "--weights", "/nope"], "weights '/nope'"),
    ],
    ids=["model", "task", "key", "value", "weights"],
)
def test_bad_input_is_one_line_exit_2_no_traceback(args, message, tmp_path):
    proc = harness(*args, "--results-dir", str(tmp_path))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_report_shows_pairs_tolerances_and_provenance(tiny_run, tmp_path):
    out = tmp_path / "report.md"
    assert main(["report", "--results-dir", str(tiny_run.path.parent.parent), "--out", str(out)]) == 0
    text = out.read_text()
    for needle in (
        "## Task `ppl`",
        "## Task `parity`",
        "gpt2-scratch | gpt2-hf",
        "random:tiny",
        "## Provenance",
        "max_abs_logit_diff",
        "within",
    ):
        assert needle in text, needle
    assert "**NO**" not in text
    assert list((tmp_path / "figures").glob("*.png"))


def _copy_results(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_gate_passes_on_its_own_baseline(tiny_run, tmp_path):
    results = tiny_run.path.parent.parent
    assert main(["gate", "--baseline", str(results), "--results-dir", str(results), "--require-all"]) == 0


def _perturb(results_dir, metric, factor):
    for path in results_dir.glob("v*/*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            if row["metric"] == metric and row["model"] == "gpt2-scratch":
                row["value"] *= factor
                row["created_at"] = "2999-01-01T00:00:00+00:00"  # newest
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_gate_fails_on_a_deliberately_regressed_metric(tiny_run, tmp_path, capsys):
    baseline = tiny_run.path.parent.parent
    current = _copy_results(baseline, tmp_path / "current")
    _perturb(current, "word_perplexity", 1.01)  # 1% worse, over the 0.1% tolerance
    assert main(["gate", "--baseline", str(baseline), "--results-dir", str(current)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "word_perplexity" in out and "FAILED" in out
    # a looser tolerance for that metric lets it through; an improvement never fails
    assert (
        main(["gate", "--baseline", str(baseline), "--results-dir", str(current), "--tol", "word_perplexity=rel:0.02"])
        == 0
    )
    _perturb(current, "word_perplexity", 0.5)
    assert main(["gate", "--baseline", str(baseline), "--results-dir", str(current)]) == 0


def test_gate_skip_lists_a_metric_without_gating_it(tiny_run, tmp_path, capsys):
    baseline = tiny_run.path.parent.parent
    current = _copy_results(baseline, tmp_path / "current")
    _perturb(current, "word_perplexity", 1.5)
    args = ["gate", "--baseline", str(baseline), "--results-dir", str(current), "--require-all"]
    assert main([*args, "--skip", "word_perplexity"]) == 0
    assert "skipped" in capsys.readouterr().out
    assert main([*args, "--skip", "token_perplexity"]) == 1  # skipping another metric does not hide it


def test_gate_fails_when_parity_breaks(tiny_run, tmp_path):
    baseline = tiny_run.path.parent.parent
    current = _copy_results(baseline, tmp_path / "current")
    _perturb(current, "max_abs_logit_diff", 1e4)
    assert main(["gate", "--baseline", str(baseline), "--results-dir", str(current)]) == 1


def test_gate_require_all_fails_on_missing_metrics(tiny_run, tmp_path):
    """Nothing compared is a failure (exit 3), with or without --require-all; it used to "pass" with 0."""
    baseline = tiny_run.path.parent.parent
    empty = tmp_path / "empty"
    (empty / "v1").mkdir(parents=True)
    (empty / "v1" / "x.jsonl").write_text("")
    assert main(["gate", "--baseline", str(baseline), "--results-dir", str(empty)]) == 3
    assert main(["gate", "--baseline", str(baseline), "--results-dir", str(empty), "--require-all"]) == 3
