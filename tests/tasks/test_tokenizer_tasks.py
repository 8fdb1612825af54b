"""The tokenizer pair (harness/models/tokenizers_pair.py) and the `bpe-parity` / `bpe-train` tasks."""

from __future__ import annotations

import pandas as pd
import pytest

from harness.api import HarnessError, UnknownNameError, load_weights
from harness.models import tokenizers_pair
from harness.models.tokenizers_pair import ARCH, LibraryBPE, ScratchBPE
from harness.runner import RunPlan, run
from reproductions.bpe import ByteBPE
from tasks.tokenizer_tasks import BpeParity, BpeParityConfig, summary_table


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Both tokenizers on both tasks: 200 texts per source, 400 Tiny Shakespeare lines, two small vocabularies."""
    plan = RunPlan(models=["bpe-scratch", "bpe-hf"], tasks=["bpe-parity", "bpe-train"], limit=200,
                   results_dir=str(tmp_path_factory.mktemp("results")),
                   overrides={"bpe-train": {"vocab_sizes": "300,400"}})
    store, failures = run(plan)
    assert failures == []
    return store.rows


def values(rows, task, model):
    return {(r.subtask, r.metric): r.value for r in rows if r.task == task and r.model == model}


def test_gpt2_merges_encode_identically(rows):
    ours, theirs = values(rows, "bpe-parity", "bpe-scratch"), values(rows, "bpe-parity", "bpe-hf")
    for sub in ("wikitext2-test", "glue"):
        assert ours[(sub, "texts")] == 200
        assert ours[(sub, "mismatches")] == 0
        assert ours[(sub, "roundtrip_failures")] == theirs[(sub, "roundtrip_failures")] == 0
        assert ours[(sub, "tokens")] == theirs[(sub, "tokens")] > 200
    assert (("glue", "mismatches")) not in theirs  # the reference is not compared with itself


def test_training_learns_the_same_merges(rows):
    ours, theirs = values(rows, "bpe-train", "bpe-scratch"), values(rows, "bpe-train", "bpe-hf")
    for sub in ("vocab300", "vocab400"):
        assert ours[(sub, "merges_equal")] == 1.0
        assert ours[(sub, "bytes_per_token")] == theirs[(sub, "bytes_per_token")] > 1.0
        assert ours[(sub, "train_time_ratio")] > 0
    assert ours[("vocab400", "bytes_per_token")] >= ours[("vocab300", "bytes_per_token")]


def test_report_tables(rows):
    df = pd.DataFrame([r.__dict__ for r in rows])
    parity = summary_table(df[df["task"] == "bpe-parity"], "bpe-parity summary", ["texts", "mismatches"])
    assert "| bpe-scratch | glue | 200 | 0 |" in parity
    train = BpeParity.report_section(df[df["task"] == "bpe-train"], None, None)
    assert train == ""  # no bpe-parity metric among bpe-train rows


def test_a_missing_merge_is_caught(tmp_path, monkeypatch):
    """Drop GPT-2's first merge ("Ġ t") from the scratch tokenizer only: mismatches must appear."""
    original = ScratchBPE.from_vocab
    monkeypatch.setattr(ScratchBPE, "from_vocab", staticmethod(lambda encoder, merges: original(encoder, merges[1:])))
    store, failures = run(RunPlan(models=["bpe-scratch"], tasks=["bpe-parity"], limit=50, results_dir=str(tmp_path)))
    assert failures == []
    bad = [r for r in store.rows if r.metric == "mismatches" and r.value > 0]
    assert bad and "first_mismatch" in bad[0].extra


def test_directory_weights_and_their_hash(tmp_path):
    trained = ByteBPE.train(["hello hello world, hello there\n"] * 3, 270)
    trained.save(tmp_path)
    weights = load_weights(ARCH, str(tmp_path), seed=0)
    gpt2 = load_weights(ARCH, None, seed=0)
    assert gpt2.identity == "gpt2" and weights.sha256 != gpt2.sha256
    encoder, merges = tokenizers_pair.read_files(weights)
    assert encoder == trained.encoder and merges == trained.merges
    assert LibraryBPE.from_vocab(encoder, merges).encode_batch(["hello"]) == [trained.encode("hello")]


def test_bad_weights_are_one_line_errors(tmp_path):
    with pytest.raises(HarnessError, match="encoder.json and vocab.bpe"):
        load_weights(ARCH, str(tmp_path), seed=0)
    with pytest.raises(UnknownNameError, match="unknown bpe size"):
        load_weights(ARCH, "random:tiny", seed=0)


def test_unknown_subtask():
    with pytest.raises(UnknownNameError, match="wikitext2-test, glue"):
        BpeParity(BpeParityConfig(subtasks=("ptb",)))


def test_tokenizers_cannot_be_asked_for_logits(tmp_path):
    store, failures = run(RunPlan(models=["bpe-scratch"], tasks=["parity"], results_dir=str(tmp_path)))
    assert len(failures) == 1 and "cannot 'logits'" in failures[0].message
