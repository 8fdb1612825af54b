"""The encoder-decoder pair (harness/models/seq2seq.py) and the `seq2seq` task (tasks/seq2seq.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import transformers

from harness.api import MODELS, HarnessError, RunContext, UnknownNameError, Weights, load_plugins, load_weights
from harness.models.seq2seq import ARCH, BOS, EOS, PAD, UNK, task_tokenizer
from harness.runner import ModelPool, RunPlan, run
from reproductions.transformer import TransformerConfig
from tasks.seq2seq import (
    SUBTASKS,
    Seq2Seq,
    Seq2SeqConfig,
    make_split,
    ratio_bootstrap,
    seq2seq_table,
    step_rows,
    token_hits,
    train,
)

# A few dozen steps: enough to see the loss fall and every code path run, in seconds.
QUICK = {"steps": "30", "train_examples": "300", "eval_examples": "8", "bootstrap": "50"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pool():
    load_plugins()
    return ModelPool(RunPlan(models=["transformer-scratch", "transformer-hf"], tasks=["parity"]))


def test_task_tokenizer_is_one_token_per_character():
    tok = task_tokenizer()
    assert tok.encode("r120") == [tok.backend.token_to_id(c) for c in "r120"]
    assert tok.decode(tok.encode("a12+3 Hi!")) == "a12+3 Hi!"
    assert tok.encode("é") == [UNK]
    assert (tok.pad_id, tok.eot_id, tok.vocab_size) == (PAD, EOS, 82)


def test_default_weights_are_tiny_marian_with_the_task_vocabulary():
    weights = load_weights(ARCH, None, seed=0)
    cfg = weights.hf_config
    assert weights.identity == "random:tiny"
    assert (cfg.d_model, cfg.encoder_layers, cfg.vocab_size) == (32, 2, 82)
    assert (cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id) == (BOS, EOS, PAD)
    assert TransformerConfig.from_hf(cfg).d_ff == 64


def test_scratch_refuses_a_marian_config_it_does_not_compute():
    cfg = transformers.MarianConfig(activation_function="swish")
    weights = Weights("swish-marian", "0" * 64, cfg, {}, task_tokenizer())
    load_plugins()
    with pytest.raises(HarnessError, match="transformer-scratch cannot load weights 'swish-marian': .*"
                       "activation_function != relu"):
        MODELS.get("transformer-scratch").build(weights, "cpu")


def test_reference_layout_names_every_marian_parameter(pool):
    scratch, hf = pool.get("transformer-scratch"), pool.get("transformer-hf")
    ours = scratch.reference_layout(dict(scratch.module.named_parameters()))
    theirs = {n for n, p in hf.module.named_parameters() if p.requires_grad}
    assert theirs == set(ours)


def test_batched_greedy_decoding_matches_marian(pool):
    scratch, hf = pool.get("transformer-scratch"), pool.get("transformer-hf")
    tok = scratch.tokenizer
    sources = [tok.encode(s) for s in ("r12345", "s9", "a12+345")]  # different lengths: padded batch
    ours, theirs = scratch.greedy_batch(sources, 10), hf.greedy_batch(sources, 10)
    assert ours == theirs and len(ours) == 3
    assert all(EOS not in row for row in ours)


def test_examples_are_correct_seeded_and_held_out():
    cfg = Seq2SeqConfig(train_examples=600)
    train, evals = make_split(cfg, seed=0, n_eval=20)
    assert (train, evals) == make_split(cfg, seed=0, n_eval=20)
    assert {e.source for e in train}.isdisjoint(e.source for e in evals)
    assert len(evals) == 60 and len(train) == 600
    for e in train + evals:
        body = e.source[1:]
        if e.subtask == "reverse":
            assert e.target == body[::-1]
        elif e.subtask == "sort":
            assert e.target == "".join(sorted(body))
        else:
            a, b = body.split("+")
            assert int(e.target) == int(a) + int(b) and len(a) <= cfg.max_len // 2
    assert set(SUBTASKS) == {"reverse", "sort", "add"}


def test_token_hits_count_target_positions_and_the_end():
    assert token_hits([5, 6, 7], [5, 6, 7], eos=2) == (4, 4)
    assert token_hits([5], [5, 6, 7], eos=2) == (1, 4)  # stopped early
    assert token_hits([5, 9, 7, 8], [5, 6, 7], eos=2) == (2, 4)  # too long: misses the end


def test_ratio_bootstrap():
    num, den = np.array([1.0, 0.0, 1.0, 1.0]), np.ones(4)
    est = ratio_bootstrap(num, den, resamples=200, seed=0)
    assert est.value == 0.75 and 0 < est.stderr < 0.5 and est.low <= 0.75 <= est.high
    assert ratio_bootstrap(num, den, resamples=0, seed=0).stderr is None


def test_step_rows_cover_epochs_in_full_batches():
    rows = step_rows(10, 4, steps=5, seed=0)
    assert len(rows) == 5 and all(len(r) == 4 for r in rows)
    assert rows == step_rows(10, 4, steps=5, seed=0)


def test_without_dropout_both_implementations_train_identically(monkeypatch):
    """Dropout off, same weights, same batches: the step losses agree to float precision.
    (Over ~150+ steps rounding differences grow chaotically; see docs/reproductions.md.)"""
    from reproductions import transformer

    no_dropout = dataclasses.replace(transformer.name_to_config["tiny"], dropout=0.0)
    monkeypatch.setitem(transformer.name_to_config, "tiny-no-dropout", no_dropout)
    pool = ModelPool(RunPlan(models=["transformer-scratch"], tasks=["seq2seq"], weights="random:tiny-no-dropout"))
    cfg = Seq2SeqConfig(steps=25, train_examples=600)
    data, _ = make_split(cfg, seed=0, n_eval=4)
    ctx = RunContext(seed=0, limit=None, device="cpu", reference=pool.reference, track=lambda it, **_: it)
    ours, theirs = (train(pool.get(name), data, cfg, ctx) for name in ("transformer-scratch", "transformer-hf"))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert ours[-1] < ours[0]


def test_config_errors_are_one_line():
    with pytest.raises(UnknownNameError, match="known: reverse, sort, add"):
        Seq2Seq(Seq2SeqConfig(subtasks=("copy",)))
    with pytest.raises(HarnessError, match="source=hub"):
        Seq2Seq(Seq2SeqConfig(source="hub"))


def test_sources_longer_than_the_model_fail_cleanly(tmp_path):
    plan = RunPlan(models=["transformer-scratch"], tasks=["seq2seq"], results_dir=str(tmp_path),
                   overrides={"seq2seq": {**QUICK, "max_len": "80", "subtasks": "reverse"}})
    _, failures = run(plan)
    assert len(failures) == 1 and "lower seq2seq.max_len" in failures[0].message


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    plan = RunPlan(models=["transformer-scratch", "transformer-hf"], tasks=["seq2seq", "parity"],
                   results_dir=str(tmp_path_factory.mktemp("results")), overrides={"seq2seq": QUICK})
    store, failures = run(plan)
    assert failures == []
    return store


def test_both_models_train_and_are_scored_per_subtask(quick_run):
    rows = [r for r in quick_run.rows if r.task == "seq2seq"]
    for model in ("transformer-scratch", "transformer-hf"):
        mine = {(r.subtask, r.metric): r for r in rows if r.model == model}
        for sub in ("reverse", "sort", "add"):
            for metric in ("exact_match", "token_accuracy"):
                row = mine[(sub, metric)]
                assert 0.0 <= row.value <= 1.0 and row.n == 8 and row.stderr is not None
        loss = mine[("", "final_train_loss")]
        assert loss.value < loss.extra["first_train_loss"]  # it learns something in 30 steps
        assert mine[("", "train_seconds")].value > 0


def test_weights_are_restored_after_training(quick_run):
    parity = {(r.model, r.metric): r.value for r in quick_run.rows if r.task == "parity"}
    assert parity[("transformer-scratch", "max_abs_logit_diff")] <= 1e-5  # run after seq2seq, same adapter


def test_report_table(quick_run):
    import pandas as pd

    df = pd.DataFrame([r.__dict__ for r in quick_run.rows if r.task == "seq2seq"])
    table = seq2seq_table(df)
    assert "| reverse |" in table and "transformer-hf (`random:tiny`)" in table and "_train_seconds_" in table


def test_models_are_registered_as_a_pair():
    load_plugins()
    info = MODELS.get("transformer-scratch").info
    assert (info.arch, info.reference) == ("transformer", "transformer-hf")


@pytest.mark.slow
def test_transformer_base_is_at_parity(tmp_path):
    """The paper's base size (Table 3), with the task vocabulary, through the harness."""
    store, failures = run(RunPlan(models=["transformer-scratch"], tasks=["parity"], weights="random:base",
                                  results_dir=str(tmp_path)))
    rows = {r.metric: r.value for r in store.rows}
    assert not failures
    assert rows["max_abs_logit_diff"] <= 1e-5 and rows["max_abs_grad_diff"] <= 1e-5
    assert rows["greedy_tokens_equal"] == 1.0
