"""The lm-eval bridge (harness/lm_eval_bridge.py, docs/lm-eval.md): for each output type
(loglikelihood / multiple_choice, loglikelihood_rolling, generate_until) the scratch model equals its
reference, and both equal lm-eval's own Hugging Face backend (`HFLM(pretrained=DIR)`) on the same
weights: accuracies, is-greedy flags and generated text exactly, log-likelihoods and perplexities to
1e-6 relative. Weights: random:tiny GPT-2 (block size 64, so long texts need several windows) saved
as an HF-format directory.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from harness.api.data import load_wikitext_documents  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "tasks" / "lm_eval"
EOT = "<|endoftext|>"
RTOL = 1e-6  # log-likelihoods and perplexities; everything else must be equal
SAMPLES = {"harness_sst2": list(range(8)), "harness_sst2_gen": list(range(4)), "harness_wikitext": [0]}
LONG = load_wikitext_documents("test")[0][:1500]  # ~330 tokens: six windows of 64
LOGLIK = [
    ("The capital of France is", " Paris"),
    ("Hello ", "world"),  # the trailing space moves to the continuation
    ("", "An empty context is the prefix token"),
    ("", f"{EOT} starts with the prefix token itself"),
    (LONG, " and the rest"),  # longer than max_length: left-truncated
]
ROLLING = ["", "One short line.", LONG]
GENERATE = [
    ("Question: Is this sentence positive or negative?\nAnswer:", {"until": ["\n"], "max_gen_toks": 8}),
    ("The game began", {"until": [".", ","], "max_gen_toks": 12, "do_sample": False}),
    (LONG, {"until": [], "max_gen_toks": 6}),  # left-truncated to 64 - 6 tokens
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """random:tiny GPT-2 saved as an HF-format directory: config, safetensors and the GPT-2 tokenizer."""
    import transformers

    from harness.api import MODELS, load_weights

    arch = MODELS.get("gpt2-hf").arch
    weights = load_weights(arch, "random:tiny", seed=0)
    model = arch.hf_model_class(weights.hf_config)
    model.load_state_dict(weights.state_dict)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(out)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=weights.tokenizer.backend,
                                                     eos_token=EOT, bos_token=EOT)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lms(checkpoint):
    from lm_eval.models.huggingface import HFLM

    from harness.lm_eval_bridge import HarnessLM

    return {
        "hflm": HFLM(pretrained=str(checkpoint), device="cpu", batch_size=1),
        "scratch": HarnessLM(name="gpt2-scratch", weights=str(checkpoint), batch_size=3),
        "reference": HarnessLM(name="gpt2-hf", weights=str(checkpoint)),
    }


def _instances(kind: str, arguments: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)]


def _answers(lms, kind: str, arguments: list[tuple]) -> dict:
    return {name: getattr(lm, kind)(_instances(kind, arguments)) for name, lm in lms.items()}


def test_loglikelihood_requests_equal_hflm(lms):
    greedy = lms["hflm"].generate_until(_instances("generate_until", [("The capital of France is",
                                                                       {"until": [], "max_gen_toks": 3})]))[0]
    out = _answers(lms, "loglikelihood", [*LOGLIK, ("The capital of France is", greedy)])
    want = out["hflm"]
    assert want[-1][1] is True and not all(g for _, g in want)  # both kinds of is-greedy are exercised
    for name in ("scratch", "reference"):
        assert [g for _, g in out[name]] == [g for _, g in want], name
        for (ll, _), (ref, _) in zip(out[name], want):
            assert math.isclose(ll, ref, rel_tol=RTOL), (name, ll, ref)


def test_loglikelihood_rolling_requests_equal_hflm(lms):
    out = _answers(lms, "loglikelihood_rolling", [(t,) for t in ROLLING])
    assert out["hflm"][0] == 0 and out["hflm"][2] < out["hflm"][1] < 0
    for name in ("scratch", "reference"):
        for ll, ref in zip(out[name], out["hflm"]):
            assert math.isclose(ll, ref, rel_tol=RTOL, abs_tol=0), (name, ll, ref)


def test_generate_until_requests_equal_hflm(lms):
    out = _answers(lms, "generate_until", GENERATE)
    assert any(out["hflm"]), "some text is generated"
    assert out["scratch"] == out["hflm"] and out["reference"] == out["hflm"]
    for text, (_, kwargs) in zip(out["hflm"], GENERATE):
        assert not any(stop in text for stop in kwargs["until"])


def test_a_users_model_file_equals_hflm(lms, checkpoint):
    """A user's nanoGPT-style file held to gpt2-hf (docs/bring-your-own.md) answers as HFLM does."""
    from harness.lm_eval_bridge import HarnessLM

    user = HarnessLM(name=str(REPO / "examples" / "nanogpt_gpt2.py:build"), reference="gpt2-hf",
                     weights=str(checkpoint), batch_size=2)
    both = {"hflm": lms["hflm"], "user": user}
    loglik = _answers(both, "loglikelihood", LOGLIK)
    assert [g for _, g in loglik["user"]] == [g for _, g in loglik["hflm"]]
    assert all(math.isclose(a, b, rel_tol=RTOL) for (a, _), (b, _) in zip(loglik["user"], loglik["hflm"]))
    generated = _answers(both, "generate_until", GENERATE[:2])
    assert generated["user"] == generated["hflm"]


@pytest.fixture(scope="module")
def task_results(lms, checkpoint):
    """The three shipped tasks (one per output type) through lm_eval.simple_evaluate: HFLM, the reference
    bridge object, and the scratch model by name (`model="harness"`, lm-eval's registry)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import harness.lm_eval_bridge  # noqa: F401  (registers `harness`)

    manager = TaskManager(include_path=str(SHIPPED), include_defaults=False)
    with pytest.MonkeyPatch.context() as mp:  # lm-eval's environment report shells out to pip (seconds)
        mp.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
        run = lambda model, **kw: lm_eval.simple_evaluate(model=model, tasks=list(SAMPLES), samples=SAMPLES,
                                                          task_manager=manager, **kw)
        return {
            "hflm": run(lms["hflm"]),
            "reference": run(lms["reference"]),
            "scratch": run("harness", model_args=f"name=gpt2-scratch,weights={checkpoint},batch_size=4"),
        }


@pytest.mark.parametrize("metric", ["acc,none", "acc_norm,none", "exact_match,strip", "word_perplexity,none",
                                    "byte_perplexity,none", "bits_per_byte,none"])
def test_shipped_tasks_equal_hflm(task_results, metric):
    task = {"acc": "harness_sst2", "acc_norm": "harness_sst2", "exact_match": "harness_sst2_gen"}.get(
        metric.split(",")[0], "harness_wikitext")
    want = task_results["hflm"]["results"][task][metric]
    for name in ("scratch", "reference"):
        got = task_results[name]["results"][task][metric]
        if "perplexity" in metric or "bits" in metric:
            assert math.isclose(got, want, rel_tol=RTOL), (name, got, want)
        else:
            assert got == want, (name, got, want)


def test_shipped_tasks_score_the_same_requests(task_results):
    """Per document: the same generations and the same multiple-choice log-likelihoods."""
    def per_doc(name, task, key):
        return [s[key] for s in task_results[name]["samples"][task]]

    want_gen = per_doc("hflm", "harness_sst2_gen", "resps")
    want_mc = per_doc("hflm", "harness_sst2", "resps")
    for name in ("scratch", "reference"):
        assert per_doc(name, "harness_sst2_gen", "resps") == want_gen
        for got, want in zip(per_doc(name, "harness_sst2", "resps"), want_mc):
            assert [g[0][1] for g in got] == [w[0][1] for w in want]
            assert all(math.isclose(g[0][0], w[0][0], rel_tol=RTOL) for g, w in zip(got, want))


def test_rolling_windows_are_lm_evals(lms):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from harness.lm_eval_bridge import rolling_windows

    for n, max_length in [(0, 4), (1, 4), (4, 4), (5, 4), (13, 4), (9, 8), (130, 64)]:
        tokens = list(range(100, 100 + n))
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, max_length, 1)]
        ours = rolling_windows(tokens, 0, max_length)
        # lm-eval's (context, continuation) as the model's input window and the number of scored tokens
        assert [((c + t)[-(max_length + 1):], len(t)) for c, t in theirs] == ours


def test_command_writes_rows_equal_to_hflm(task_results, checkpoint, tmp_path):
    from harness.api import load_results
    from harness.cli import main

    rc = main(["lm-eval", "--model", "gpt2-scratch", "--weights", str(checkpoint), "--tasks",
               "harness_sst2,harness_wikitext", "--limit", "1", "--results-dir", str(tmp_path)])
    assert rc == 0
    rows = load_results(tmp_path)
    by = {(r.subtask, r.metric): r for r in rows.itertuples()}
    assert set(rows.task) == {"lm-eval"} and set(rows.model) == {"gpt2-scratch"}
    assert set(by) == {("harness_sst2", "acc"), ("harness_sst2", "acc_norm"), ("harness_wikitext", "word_perplexity"),
                       ("harness_wikitext", "byte_perplexity"), ("harness_wikitext", "bits_per_byte")}
    hflm = task_results["hflm"]
    assert by["harness_sst2", "acc"].value == hflm["samples"]["harness_sst2"][0]["acc"]  # document 0
    assert by["harness_sst2", "acc"].stderr is None  # one document: lm-eval reports N/A, the row none
    assert math.isclose(by["harness_wikitext", "word_perplexity"].value,
                        hflm["results"]["harness_wikitext"]["word_perplexity,none"], rel_tol=RTOL)
    assert all(r.config["limit"] == 1 and r.config["lm_eval_task"] == r.subtask for r in rows.itertuples())


@pytest.mark.slow
def test_command_wikitext_equals_harness_ppl(task_results, tmp_path):
    """harness_wikitext is lm-eval's wikitext on the vendored file, and `harness run --tasks ppl` is
    defined as lm-eval's wikitext: on the same article they agree."""
    from harness.runner import RunPlan, run

    store, failures = run(RunPlan(models=["gpt2-scratch"], tasks=["ppl"], weights="random:tiny", limit=1,
                                  results_dir=str(tmp_path)))
    assert not failures
    ppl = {r.metric: r.value for r in store.rows}
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isclose(ppl[metric], task_results["scratch"]["results"]["harness_wikitext"][f"{metric},none"],
                            rel_tol=RTOL)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task"], "unknown lm-eval task 'no_such_task'"),
    (["--tasks", "harness_sst2", "--include-path", "/nonexistent/tasks"], "--include-path /nonexistent/tasks"),
    (["--tasks", "harness_sst2", "--limit", "0"], "--limit 0: must be at least 1"),
    (["--tasks", "harness_sst2", "--num-fewshot", "-1"], "--num-fewshot -1"),
    (["--tasks", "harness_sst2", "--model", "no-such-model"], "unknown model 'no-such-model'"),
], ids=["unknown-task", "missing-include-dir", "limit-0", "negative-fewshot", "unknown-model"])
def test_bad_input_is_one_line_before_weights_load(argv, message, tmp_path, capsys, monkeypatch):
    """Weights that do not exist would fail as soon as they load: each error below comes first."""
    import harness.lm_eval_cmd as cmd
    from harness.cli import main

    monkeypatch.setattr(cmd, "_mentioned_in_builtin_tasks", lambda name: False)  # skip the ~15k-file search
    model = [] if "--model" in argv else ["--model", "gpt2-scratch"]
    rc = main(["lm-eval", *model, "--weights", str(tmp_path / "missing"), *argv, "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_unknown_task_is_searched_in_lm_evals_own_tasks(tmp_path, capsys):
    from harness.cli import main

    rc = main(["lm-eval", "--model", "gpt2-scratch", "--tasks", "harness_nope", "--results-dir", str(tmp_path)])
    assert rc == 2 and "unknown lm-eval task 'harness_nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_lm_eval_cli_reaches_the_bridge(checkpoint, task_results, tmp_path):
    """lm-eval's own command line, through `python -m harness.lm_eval_bridge` (registers `harness` first)."""
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "harness.lm_eval_bridge", "--model", "harness", "--model_args",
                    f"name=gpt2-scratch,weights={checkpoint}", "--tasks", "harness_sst2", "--include_path",
                    str(SHIPPED), "--limit", "4", "--device", "cpu", "--output_path", str(out)],
                   cwd=REPO, check=True, timeout=900)
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    first4 = [s["acc"] for s in task_results["hflm"]["samples"]["harness_sst2"][:4]]
    assert results["results"]["harness_sst2"]["acc,none"] == sum(first4) / 4
