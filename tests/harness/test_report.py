"""The report leads with its verdict: scorecard verdicts, numbers by kind, run scoping, plots with the
tolerance drawn, the terminal table's verdicts, and `harness list` (its columns, and no plugin imported)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.api import ResultRow
from harness.cli import main, results_table
from harness.report import fmt_delta, fmt_value, judge, metric_kind, verdict

ROOT = Path(__file__).resolve().parents[2]


def row(model, task, metric, value, *, weights="w1", subtask="", n=10, stderr=None, run_id="20260101T000000Z-aaaaaa",
        created_at="2026-01-01T00:00:00+00:00", config=None, extra=None, higher_is_better=False) -> dict:
    return dict(model=model, weights=weights, weights_sha256="0" * 64, task=task, task_version="1.0", subtask=subtask,
                metric=metric, value=value, n=n, stderr=stderr, higher_is_better=higher_is_better,
                config=config if config is not None else {"limit": None}, seed=0, run_id=run_id, created_at=created_at,
                git_sha="abc", git_dirty=False, harness_version="0.1.0", torch_version="t", transformers_version="x",
                device="cpu", wall_seconds=1.0, extra=extra or {}, schema_version=1)


def write_rows(results: Path, rows: list[dict], name: str = "run") -> Path:
    (results / "v1").mkdir(parents=True, exist_ok=True)
    path = results / "v1" / f"{name}.jsonl"
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return results


def scorecard_lines(text: str) -> list[str]:
    card = text.split("## Scorecard", 1)[1].split("## Task", 1)[0]
    return [line for line in card.splitlines() if line.startswith("| [")]


@pytest.fixture
def results(tmp_path):
    rows = [
        # w1: the pair agrees (ppl's tolerance is 1e-5 relative), and a timing 3x apart is listed, not judged
        row("gpt2-scratch", "ppl", "word_perplexity", 100.0), row("gpt2-hf", "ppl", "word_perplexity", 100.0005),
        row("gpt2-scratch", "ppl", "eval_seconds", 3.0), row("gpt2-hf", "ppl", "eval_seconds", 1.0),
        # w2: it diverges, by -10
        row("gpt2-scratch", "ppl", "word_perplexity", 100.0, weights="w2"),
        row("gpt2-hf", "ppl", "word_perplexity", 110.0, weights="w2"),
        # w3: the reference was not run
        row("gpt2-scratch", "ppl", "word_perplexity", 100.0, weights="w3"),
        # parity: the value is itself the difference, held to 1e-5
        row("gpt2-scratch", "parity", "max_abs_logit_diff", 3e-5, n=128, extra={"reference": "gpt2-hf"}),
        row("llama-scratch", "parity", "max_abs_logit_diff", 2e-7, n=128, extra={"reference": "llama-hf"}),
        # a count
        row("bpe-scratch", "bpe-parity", "texts", 118337.0, weights="gpt2", subtask="glue"),
        row("bpe-hf", "bpe-parity", "texts", 118337.0, weights="gpt2", subtask="glue"),
    ]
    return write_rows(tmp_path / "results", rows)


def test_scorecard_says_agrees_diverges_and_not_run(results, tmp_path):
    out = tmp_path / "r" / "report.md"
    assert main(["report", "--results-dir", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.index("## Scorecard") < text.index("## Task")  # the verdict leads
    card = {(line.split(" | ")[0], line.split(" | ")[1], line.split(" | ")[3]): line for line in scorecard_lines(text)}
    w1 = card[("| [ppl](#ppl-w1)", "gpt2-scratch", "`w1`")]
    assert "[agrees (1 metric)](#ppl-w1)" in w1 and "gpt2-hf" in w1
    assert "1 of 1 outside 2x" in w1  # the 3x timing shows in its own column, not in the verdict
    w2 = card[("| [ppl](#ppl-w2)", "gpt2-scratch", "`w2`")]
    assert "**diverges**: 1 of 1 metrics; worst word_perplexity: -10 (allowed 0.0011)" in w2
    assert "not run: no gpt2-hf rows on these weights" in card[("| [ppl](#ppl-w3)", "gpt2-scratch", "`w3`")]
    parity = card[("| [parity](#parity-w1)", "gpt2-scratch", "`w1`")]
    assert "3.00e-05" in parity and "needs <= 1e-05" in parity and "**diverges**" in parity
    assert "agrees" in card[("| [parity](#parity-w1)", "llama-scratch", "`w1`")]
    assert "**3 agree, 2 diverge, 1 not run**" in text  # bpe-parity agrees too
    for anchor in ("ppl-w1", "ppl-w2", "ppl-w3", "parity-w1"):
        assert f'<a id="{anchor}"></a>' in text  # every link lands on its section


def test_tables_carry_n_and_limit_print_by_kind_and_judge_timings_apart(results, tmp_path):
    out = tmp_path / "report.md"
    assert main(["report", "--results-dir", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "118,337" in text and "118337.0000" not in text
    parity = text.split("## Task `parity`")[1].split("## Task")[0]
    header = next(line for line in parity.splitlines() if line.startswith("| subtask"))
    assert header == "| subtask | metric | gpt2-scratch | llama-scratch | n | limit | tolerance | within |"
    assert "reference value" not in parity and "delta" not in parity  # its always-empty columns are gone
    line = ("| - | max_abs_logit_diff | 3.00e-05 | 2.00e-07 | 128 | all | <= 1e-05 "
            "| gpt2-scratch: **NO**; yes (1 other) |")
    assert line in parity
    ppl = text.split("## Task `ppl`")[1].split("## Task")[0]
    assert "| - | eval_seconds | 3 | 1 | 10 | all | within 2x | outside 2x (3.00x) |" in ppl.split("Timings")[1]
    quality = ppl.split("Timings")[0]
    assert "eval_seconds" not in quality
    assert "| - | word_perplexity | 100 | 100.001 | 10 | all | ±0.001 | yes |" in quality
    assert list((tmp_path / "figures").glob("*.png"))


def test_numbers_print_by_kind():
    assert fmt_value(118337.0, "count") == "118,337"
    assert fmt_value(0.0, "count") == "0"
    assert fmt_value(3.8e-06, "diff") == "3.80e-06" and fmt_value(0.0, "diff") == "0"
    assert fmt_value(0.812, "rate") == "0.8120"
    assert fmt_value(3604.2755998, "perplexity") == "3604.28"
    assert fmt_value(1.0, "flag") == "yes" and fmt_value(0.0, "flag") == "no"
    assert fmt_value(11496.69, "timing") == "11,497" and fmt_value(1.504, "timing") == "1.5"
    assert fmt_value(0.7543, "timing", "mfu") == "75.4%"
    assert fmt_value(float("nan")) == "-" and fmt_value(None) == "-"
    assert fmt_delta(4.06e-06) == "+4.06e-06" and fmt_delta(-0.806) == "-0.806" and fmt_delta(0.0) == "0"
    kinds = {m: metric_kind(m) for m in ("texts", "greedy_tokens_equal", "max_abs_grad_diff", "word_perplexity",
                                         "accuracy", "valid_rate", "train_seconds", "prefill_tokens_per_s",
                                         "peak_memory_mb", "mfu", "nll")}
    assert kinds == {"texts": "count", "greedy_tokens_equal": "flag", "max_abs_grad_diff": "diff",
                     "word_perplexity": "perplexity", "accuracy": "rate", "valid_rate": "rate",
                     "train_seconds": "timing", "prefill_tokens_per_s": "timing", "peak_memory_mb": "timing",
                     "mfu": "timing", "nll": "loss"}


def test_verdicts_follow_the_tolerance_rule():
    ours, theirs = row("s", "glue", "accuracy", 0.80, stderr=0.02), row("r", "glue", "accuracy", 0.75, stderr=0.02)
    check = judge("glue", "s", "r", ours, theirs)  # allowed: 1.96 * sqrt(2) * 0.02 = 0.0554
    assert check.ok and verdict([check]) == "agrees (1 metric)"
    far = judge("glue", "s", "r", {**ours, "value": 0.9}, theirs)
    assert not far.ok and verdict([far]).startswith("**diverges**: 1 of 1 metrics; worst accuracy: +0.15")
    other_plan = judge("glue", "s", "r", ours, {**theirs, "config": {"limit": 4}})
    assert other_plan.ok is None and verdict([other_plan]) == "not compared: the plans differ"
    assert verdict([], reference_ran=False, reference="r") == "not run: no r rows on these weights"
    slow = judge("glue", "s", "r", row("s", "glue", "train_seconds", 50.0), row("r", "glue", "train_seconds", 10.0))
    assert slow.timing and not slow.ok and verdict([check, slow]) == "agrees (1 metric)"  # timings never decide


def test_report_scopes_to_one_run(results, tmp_path, capsys):
    newer = [row("gpt2-scratch", "ppl", "word_perplexity", 5.0, weights="new", run_id="20270101T000000Z-bbbbbb",
                 created_at="2027-01-01T00:00:00+00:00")]
    write_rows(results, newer, "newer")
    out = tmp_path / "latest" / "report.md"
    assert main(["report", "--results-dir", str(results), "--latest", "--out", str(out)]) == 0
    text = out.read_text()
    assert "`new`" in text and "`w1`" not in text and "from 1 result rows" in text
    out = tmp_path / "one" / "report.md"
    assert main(["report", "--results-dir", str(results), "--run-id", "20260101T", "--out", str(out)]) == 0
    assert "`w1`" in out.read_text() and "`new`" not in out.read_text()
    out = tmp_path / "both" / "report.md"
    assert main(["report", "--results-dir", str(results), "--run-id", "20260101T000000Z-aaaaaa,20270101T",
                 "--out", str(out)]) == 0
    assert "`w1`" in out.read_text() and "`new`" in out.read_text()
    capsys.readouterr()
    bad = tmp_path / "bad" / "report.md"
    assert main(["report", "--results-dir", str(results), "--run-id", "1999", "--out", str(bad)]) == 2
    assert "--run-id 1999: matches no run" in capsys.readouterr().err
    assert not bad.parent.exists()  # nothing written


def test_parity_plot_draws_the_threshold():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from harness.report import _plot_metric

    block = pd.DataFrame([row("gpt2-scratch", "parity", "max_abs_logit_diff", 3e-6),
                          row("llama-scratch", "parity", "max_abs_logit_diff", 0.0)])
    fig, ax = plt.subplots()
    _plot_metric(ax, "parity", block, "max_abs_logit_diff", {})
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [1e-5]  # the dashed threshold line
    assert ax.get_yscale() == "log" and all(p.get_height() > 0 for p in ax.patches)  # 0 drawn at a floor
    plt.close(fig)


def test_run_table_shows_the_same_verdicts(capsys):
    from rich.console import Console

    rows = [ResultRow(**row("gpt2-scratch", "ppl", "word_perplexity", 100.0)),
            ResultRow(**row("gpt2-hf", "ppl", "word_perplexity", 110.0)),
            ResultRow(**row("gpt2-scratch", "parity", "max_abs_logit_diff", 2e-7, extra={"reference": "gpt2-hf"})),
            ResultRow(**row("bpe-scratch", "bpe-parity", "texts", 118337.0))]
    console = Console(width=200, record=True)
    console.print(results_table(rows))
    text = console.export_text()
    assert "NO -10 (±0.0011)" in text and "yes (<= 1e-05)" in text and "118,337" in text
    slow = [ResultRow(**row(m, "ppl", "eval_seconds", v)) for m, v in (("gpt2-scratch", 3.0), ("gpt2-hf", 1.0))]
    console = Console(width=200, record=True)
    console.print(results_table(slow))
    text = console.export_text()
    assert "3.00x (outside 2x)" in text and "NO" not in text  # a timing is a note, never a failure


def test_list_shows_weights_capabilities_pairs_and_config_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    for needle in ("default weights", "capabilities", "reference pair", "description", "held to gpt2-hf",
                   "reference of gpt2-scratch", "causal-lm", "random:tiny"):
        assert needle in out, needle
    assert main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    for needle in ("config keys (type = default)", "ppl.stride: int | None = None", "ppl.batch_size: int = 4",
                   "word_perplexity (headline): lower", "max_abs_logit_diff (headline): lower; <= 1e-05"):
        assert needle in out, needle


def test_list_imports_no_plugin_torch_or_transformers(tmp_path):
    """A current listing cache is all `harness list` reads. (The fingerprint is pinned here: in a tree being
    edited it changes with every saved file, and a stale cache is rebuilt by importing the plugins.)"""
    from harness.api.listing import write_listing

    write_listing(tmp_path / "listing-pinned.json")  # this process has the plugins loaded anyway
    code = ("import sys; import harness.api.listing as l; l.fingerprint = lambda: 'pinned'; "
            "from harness.cli import main; main(['list', 'models']); main(['list', 'tasks']); "
            "print(sorted(m for m in ('torch', 'transformers', 'pandas', 'tasks', 'harness.models') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "HARNESS_CACHE": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "gpt2-scratch" in proc.stdout and "ppl.stride" in proc.stdout


def test_listing_fingerprint_follows_plugin_files(tmp_path, monkeypatch):
    from harness.api.listing import fingerprint

    plugin = tmp_path / "my_plugin.py"
    plugin.write_text("X = 1\n")
    monkeypatch.setenv("HARNESS_PLUGINS", str(plugin))
    before = fingerprint()
    assert fingerprint() == before
    plugin.write_text("X = 22\n")  # another size: another listing
    assert fingerprint() != before
