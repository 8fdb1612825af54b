import math

import pandas as pd
import pytest
import torch

from harness.api import MODELS, TASKS, HarnessError, RunContext, load_plugins, load_weights, make_config
from tasks.char_ppl import CharPerplexity, CharPplConfig, eval_windows, load_char_data

load_plugins()
TINY = dict(steps="8", batch_size="8", seq_len="16", eval_chars="3000")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_task(model: str, seed: int = 0, **overrides: str) -> dict:
    spec = MODELS.get(model)
    adapter = spec.build(load_weights(spec.arch, None, 0), "cpu")
    task = CharPerplexity(make_config(CharPerplexity, {**TINY, **overrides}))
    task.check(adapter)
    ctx = RunContext(seed, None, "cpu", lambda m: None, lambda it, total=None, description="": it)
    return {m.metric: m for m in task.run(adapter, ctx)}


def test_split_is_ninety_ten_by_position():
    data = load_char_data(CharPplConfig())
    assert len(data.itos) == 65 and len(data.train) + len(data.val) == 1_115_394
    assert len(data.train) == int(1_115_394 * 0.9)
    assert "".join(data.itos[i] for i in data.train[:14]) == "First Citizen:"


def test_eval_windows_score_every_held_out_target_once():
    stream = torch.arange(50)
    windows = eval_windows(stream, seq_len=8)
    targets = windows[:, 1:].flatten()
    assert torch.equal(targets, torch.arange(1, len(targets) + 1))  # contiguous, no overlap
    assert len(stream) - 1 - len(targets) < 7  # only an incomplete last window is dropped


@pytest.mark.parametrize("model", ["bigram", "mlp-ngram", "gru", "char-gpt-scratch"], ids=str)
def test_rows_are_well_formed_and_seeded(model):
    rows, again = run_task(model), run_task(model)
    assert set(rows) == set(CharPerplexity.metrics)
    assert rows["bits_per_char"].value == pytest.approx(rows["val_loss"].value / math.log(2))
    assert 0 < rows["val_loss"].value < math.log(65) + 0.5
    assert rows["val_loss"].n == (3000 - 1) // 15 * 15
    for metric in ("val_loss", "train_loss"):
        assert rows[metric].value == again[metric].value
    assert rows["val_loss"].extra["sample"] == again["val_loss"].extra["sample"]
    assert len(rows["val_loss"].extra["sample"]) == 16


def test_counts_beat_uniform_and_order_helps():
    bigram, trigram = run_task("bigram")["bits_per_char"].value, run_task("trigram")["bits_per_char"].value
    assert trigram < bigram < math.log2(65) - 1.5


def test_char_gpt_pair_trains_alike():
    scratch, hf = run_task("char-gpt-scratch"), run_task("char-gpt-hf")
    assert scratch["val_loss"].value == pytest.approx(hf["val_loss"].value, abs=1e-3)


def test_another_text_file(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_text("abcabcabc" * 40, encoding="utf-8")
    rows = run_task("trigram", file=str(path), eval_chars="none")
    assert rows["val_loss"].value < 0.1  # a trigram predicts "abcabc..." exactly
    assert rows["val_loss"].extra["vocab"] == 3


@pytest.mark.parametrize("overrides, message", [
    ({"file": "/no/such/file.txt"}, "cannot read"),
    ({"val_fraction": "1.5"}, "val_fraction"),
    ({"seq_len": "100000"}, "too short"),
], ids=["missing-file", "bad-fraction", "too-short"])
def test_user_errors_are_one_line(overrides, message):
    with pytest.raises(HarnessError, match=message) as e:
        run_task("bigram", **overrides)
    assert "\n" not in str(e.value)


def test_report_section_lists_the_ladder_with_samples():
    rows = [dict(model=model, weights="random:tiny", task="char-ppl", subtask="", metric=m.metric, value=m.value,
                 extra=m.extra, created_at="2026-01-01T00:00:00+00:00")
            for model in ("char-gpt-scratch", "bigram") for m in run_task(model).values()]
    section = TASKS.get("char-ppl").report_section(pd.DataFrame(rows), None, None)
    lines = section.splitlines()
    assert lines[4].startswith("| bigram | `random:tiny` |") and lines[5].startswith("| char-gpt-scratch |")
    assert section.count("\u21b5") >= 2  # every sample starts after a newline


def test_registered():
    assert "char-ppl" in TASKS.names() and TASKS.get("char-ppl") is CharPerplexity


@pytest.mark.slow
def test_default_budget_orders_the_ladder():
    rows = {m: run_task(m, steps="500", seq_len="64", eval_chars="none")["bits_per_char"].value
            for m in ("bigram", "trigram", "rnn")}
    assert rows["rnn"] < rows["trigram"] < rows["bigram"]
