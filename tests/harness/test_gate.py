"""`harness gate` through the CLI on small synthetic baseline / result files: every status, every
exit code, plan matching, and the JUnit / JSON / GitHub step-summary reports."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.cli import main

ROW = {
    "model": "gpt2-scratch", "weights": "default", "weights_sha256": "82b51f1508dbce0e18fd5b2bb4df603bb1f79660",
    "task": "ppl", "task_version": "1.1", "subtask": "", "metric": "word_perplexity", "value": 100.0, "n": 4,
    "stderr": None, "higher_is_better": False,
    "config": {"batch_size": 4, "file": None, "limit": 4, "max_length": None, "split": "test", "stride": None},
    "seed": 0, "run_id": "r", "created_at": "2026-11-22T00:00:00+00:00", "git_sha": "x", "git_dirty": False,
    "harness_version": "0.1.0", "torch_version": "2.13.0+cpu", "transformers_version": "5.23.0", "device": "cpu",
    "wall_seconds": 1.0, "extra": {}, "schema_version": 1,
}
PARITY = {**ROW, "task": "parity", "task_version": "1.0", "metric": "max_abs_logit_diff", "value": 1e-6,
          "config": {"limit": 4}}
GLUE = {**ROW, "model": "bert-scratch", "weights": "minilm", "task": "glue", "task_version": "1.0", "subtask": "sst2",
        "metric": "accuracy", "value": 0.78, "stderr": 0.02, "higher_is_better": True,
        "config": {"limit": 400, "batch_size": 8}}


def row(base: dict, **changes) -> dict:
    out = {**base, **changes}
    if "config" in changes:
        out["config"] = {**base["config"], **changes["config"]}
    return out


def write(directory, *rows) -> str:
    (directory / "v1").mkdir(parents=True, exist_ok=True)
    (directory / "v1" / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(directory)


def gate(tmp_path, baseline_rows, current_rows, *flags, name="case"):
    """Write both sets of rows and run `harness gate`; returns the exit code and the JSON report."""
    base = write(tmp_path / name / "baseline", *baseline_rows)
    cur = write(tmp_path / name / "current", *current_rows)
    report = tmp_path / name / "gate.json"
    code = main(["gate", "--baseline", base, "--results-dir", cur, "--json", str(report), *flags])
    return code, json.loads(report.read_text())


def statuses(report) -> dict:
    return {(c["model"], c["task"], c["metric"]): c["status"] for c in report["checks"]}


# ---- one test per status --------------------------------------------------------------------------------------

def test_ok(tmp_path):
    code, report = gate(tmp_path, [ROW], [row(ROW, value=100.05)])  # inside rel 1e-3
    assert code == 0
    (check,) = report["checks"]
    assert check["status"] == "ok" and check["allowed"] == pytest.approx(0.1)
    assert report["summary"]["exit_code"] == 0 and report["summary"]["verdict"] == "passed"


def test_improved(tmp_path):
    code, report = gate(tmp_path, [ROW], [row(ROW, value=90.0)])
    assert code == 0 and report["checks"][0]["status"] == "improved"


def test_regressed_is_exit_1(tmp_path, capsys):
    code, report = gate(tmp_path, [ROW], [row(ROW, value=101.0)])
    assert code == 1
    (check,) = report["checks"]
    assert check["status"] == "REGRESSED" and check["failing"]
    assert check["baseline"] == 100.0 and check["current"] == 101.0
    assert "REGRESSED" in capsys.readouterr().out


def test_over_threshold_is_exit_1(tmp_path):
    # inside the gate tolerance of its baseline (1e-5 abs) but above parity's 1e-5 threshold
    code, report = gate(tmp_path, [row(PARITY, value=8e-6)], [row(PARITY, value=1.2e-5)])
    assert code == 1 and report["checks"][0]["status"] == "OVER THRESHOLD"


def test_missing_fails_only_with_require_all(tmp_path):
    baseline = [ROW, PARITY]
    code, report = gate(tmp_path, baseline, [ROW], name="lenient")
    assert code == 0 and statuses(report)[("gpt2-scratch", "parity", "max_abs_logit_diff")] == "MISSING"
    code, report = gate(tmp_path, baseline, [ROW], "--require-all", name="strict")
    assert code == 3
    assert report["summary"]["counts"] == {"ok": 1, "MISSING": 1}


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"config": {"limit": None}}, "limit 4 -> None"),
        ({"task_version": "1.2"}, "task_version 1.1 -> 1.2"),
        ({"seed": 1}, "seed 0 -> 1"),
        ({"weights_sha256": "0" * 64}, "weights_sha256 82b51f1508db -> 000000000000"),
    ],
    ids=["limit", "task_version", "seed", "weights"],
)
def test_config_differs_is_never_a_regression_nor_a_pass(tmp_path, change, reason):
    # 50% worse, but on another plan: not comparable, so neither REGRESSED nor ok
    code, report = gate(tmp_path, [ROW], [row(ROW, value=150.0, **change)])
    (check,) = report["checks"]
    assert check["status"] == "config differs" and reason in check["reason"]
    assert code == 3  # nothing was compared


def test_config_differs_next_to_a_compared_metric(tmp_path):
    baseline = [ROW, PARITY]
    current = [ROW, row(PARITY, config={"limit": 2})]
    code, report = gate(tmp_path, baseline, current, name="lenient")
    assert code == 0 and statuses(report)[("gpt2-scratch", "parity", "max_abs_logit_diff")] == "config differs"
    code, _ = gate(tmp_path, baseline, current, "--require-all", name="strict")
    assert code == 3  # --require-all: every baseline metric must be compared


def test_the_plan_matching_row_is_compared_not_the_newest(tmp_path):
    newest_other_plan = row(ROW, value=500.0, config={"limit": None}, created_at="2999-01-01T00:00:00+00:00")
    code, report = gate(tmp_path, [ROW], [row(ROW, value=100.0), newest_other_plan])
    assert code == 0 and report["checks"][0]["status"] == "ok" and report["checks"][0]["current"] == 100.0


def test_new_rows_are_listed_not_failing(tmp_path):
    code, report = gate(tmp_path, [ROW], [ROW, GLUE], "--require-all")
    assert code == 0
    assert statuses(report)[("bert-scratch", "glue", "accuracy")] == "new"
    new = next(c for c in report["checks"] if c["status"] == "new")
    assert new["baseline"] is None and new["current"] == 0.78 and not new["failing"]


def test_skipped_is_listed_not_gated(tmp_path, capsys):
    code, report = gate(tmp_path, [ROW, PARITY], [ROW, row(PARITY, value=1.0)], "--skip", "max_abs_logit_diff")
    assert code == 0
    assert statuses(report)[("gpt2-scratch", "parity", "max_abs_logit_diff")] == "skipped"
    assert "skipped" in capsys.readouterr().out


def test_stderr_widens_the_band(tmp_path):
    # 0.03 worse: beyond GLUE's own tolerance but inside 1.96 * sqrt(0.02^2 + 0.02^2) = 0.055
    code, report = gate(tmp_path, [GLUE], [row(GLUE, value=0.75)])
    assert code == 0 and report["checks"][0]["allowed"] == pytest.approx(1.96 * 0.02 * 2 ** 0.5)


# ---- exit codes ---------------------------------------------------------------------------------------------

def test_regression_wins_over_missing(tmp_path):
    code, report = gate(tmp_path, [ROW, PARITY], [row(ROW, value=200.0)], "--require-all")
    assert code == 1 and report["summary"]["exit_code"] == 1


def test_empty_results_dir_is_exit_3_not_passed(tmp_path, capsys):
    base = write(tmp_path / "baseline", ROW)
    (tmp_path / "empty").mkdir()
    assert main(["gate", "--baseline", base, "--results-dir", str(tmp_path / "empty")]) == 3
    out = capsys.readouterr().out
    assert "nothing compared" in out and "passed" not in out


def test_only_skipped_metrics_is_nothing_compared(tmp_path):
    code, _ = gate(tmp_path, [ROW], [ROW], "--skip", "word_perplexity")
    assert code == 3


@pytest.mark.parametrize(
    "flags",
    [["--tol", "word_perplexity=pct:1"], ["--results-dir", "/nonexistent"], ["--junit", "."]],
    ids=["bad-tol", "no-results-dir", "junit-is-a-dir"],
)
def test_usage_errors_are_exit_2_and_write_nothing(tmp_path, flags, capsys):
    base = write(tmp_path / "baseline", ROW)
    cur = write(tmp_path / "current", ROW)
    out = tmp_path / "out" / "gate.json"
    args = ["gate", "--baseline", base, "--results-dir", cur, "--json", str(out), *flags]
    assert main(args) == 2
    assert not out.exists()
    assert "error:" in capsys.readouterr().err


def test_empty_baseline_is_exit_2(tmp_path):
    (tmp_path / "baseline").mkdir()
    cur = write(tmp_path / "current", ROW)
    assert main(["gate", "--baseline", str(tmp_path / "baseline"), "--results-dir", cur]) == 2


# ---- reports -------------------------------------------------------------------------------------------------

def test_junit_has_one_testcase_per_metric_and_a_failure_with_the_numbers(tmp_path):
    base = write(tmp_path / "baseline", ROW, PARITY, GLUE)
    cur = write(tmp_path / "current", row(ROW, value=101.0), row(PARITY, config={"limit": 2}),
                row(GLUE, metric="f1"))
    xml = tmp_path / "deep" / "dir" / "gate.xml"  # parents are created
    assert main(["gate", "--baseline", base, "--results-dir", cur, "--junit", str(xml)]) == 1
    root = ET.parse(xml).getroot()
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert set(cases) == {
        ("gate.ppl.gpt2-scratch", "word_perplexity@default"),
        ("gate.parity.gpt2-scratch", "max_abs_logit_diff@default"),
        ("gate.glue.bert-scratch", "sst2/accuracy@minilm"),  # MISSING, not failing without --require-all
        ("gate.glue.bert-scratch", "sst2/f1@minilm"),  # new
    }
    failure = cases[("gate.ppl.gpt2-scratch", "word_perplexity@default")].find("failure")
    assert failure is not None and failure.get("type") == "REGRESSED"
    assert failure.get("baseline") == "100" and failure.get("value") == "101" and failure.get("tolerance") == "0.1"
    assert "baseline=100" in failure.text and "value=101" in failure.text and "tolerance=0.1" in failure.text
    for name in ("max_abs_logit_diff@default", "sst2/accuracy@minilm", "sst2/f1@minilm"):
        case = next(c for (_, n), c in cases.items() if n == name)
        assert case.find("skipped") is not None and case.find("failure") is None
    assert "config differs" in cases[("gate.parity.gpt2-scratch", "max_abs_logit_diff@default")].find(
        "skipped").get("message")
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "1", "3")


def test_junit_nothing_compared_has_a_failing_case(tmp_path):
    base = write(tmp_path / "baseline", ROW)
    cur = write(tmp_path / "current", row(ROW, config={"limit": None}))
    xml = tmp_path / "gate.xml"
    assert main(["gate", "--baseline", base, "--results-dir", cur, "--junit", str(xml)]) == 3
    assert ET.parse(xml).getroot().find("testsuite").get("failures") == "1"


def test_json_report(tmp_path):
    code, report = gate(tmp_path, [ROW, PARITY], [row(ROW, value=101.0), GLUE], "--require-all")
    assert code == 1
    assert report["summary"] == {"verdict": "FAILED: regression", "exit_code": 1, "compared": 1, "failing": 2,
                                 "counts": {"REGRESSED": 1, "MISSING": 1, "new": 1}}
    first = report["checks"][0]
    assert set(first) >= {"model", "weights", "task", "subtask", "metric", "baseline", "current", "allowed",
                          "status", "reason"}
    assert first["status"] == "REGRESSED" and first["reason"].startswith("worse by 1")


def test_github_step_summary_is_appended(tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    base = write(tmp_path / "baseline", ROW)
    cur = write(tmp_path / "current", row(ROW, value=101.0))
    assert main(["gate", "--baseline", base, "--results-dir", cur]) == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n")
    assert "### harness gate: FAILED: regression (exit 1)" in text
    assert "| gpt2-scratch | default | ppl |  | word_perplexity | 100 | 101 | 0.1 | **REGRESSED** |" in text


BASELINE = Path(__file__).resolve().parents[2] / "results" / "baseline"


def test_committed_baseline_is_current_and_passes_against_itself():
    """results/baseline carries today's task versions (else no fresh smoke run could plan-match it) and
    gates itself to exit 0."""
    from harness.api import TASKS, load_results

    rows = load_results(BASELINE)
    stale = {(t, v) for t, v in zip(rows["task"], rows["task_version"]) if TASKS.get(t).version != v}
    assert not stale, f"regenerate results/baseline (docs/harness.md): task versions {sorted(stale)} are stale"
    args = ["gate", "--baseline", str(BASELINE), "--results-dir", str(BASELINE), "--require-all"]
    assert main([*args, "--skip", "train_seconds"]) == 0
