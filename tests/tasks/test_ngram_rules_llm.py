"""ngram-rules on causal LMs (tasks/ngram_rules_llm.py): tiny random models, a few steps."""

import math
from types import SimpleNamespace

import pytest
import torch

from harness.api import MODELS, TASKS, HarnessError, RunContext, load_plugins, load_results, load_weights, make_config
from harness.api.tokenizer import gpt2_tokenizer
from harness.runner import RunPlan, run
from tasks.ngram_rules import NGramRules
from tasks.ngram_rules_llm import fine_tune, render, symbol_text, wilson

load_plugins()
TINY = dict(n="2,3", seq_len="8", train_samples="50", samples="40", eval_samples="40", steps="5",
            icl_examples="3", llm_samples="8", ft_steps="3", ft_batch_size="4")
SUBTASKS = {"n=2 icl", "n=2 ft", "n=3 icl", "n=3 ft"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(name: str):
    spec = MODELS.get(name)
    return spec.build(load_weights(spec.arch, "random:tiny", 0), "cpu")


def ctx(seed: int = 0) -> RunContext:
    return RunContext(seed, None, "cpu", lambda m: None, lambda it, total=None, description="": it)


def run_task(model, seed: int = 0, **overrides: str) -> list:
    task = NGramRules(make_config(NGramRules, {**TINY, **overrides}))
    task.validate()
    task.check(model)
    return list(task.run(model, ctx(seed)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ngram_rules_llm")
    plan = RunPlan(models=["bigram", "llama-scratch", "llama-hf"], tasks=["ngram-rules"], weights="random:tiny",
                   results_dir=str(out), overrides={"ngram-rules": TINY})
    _, failures = run(plan)
    assert failures == []
    return load_results(out)


# ---- text ---------------------------------------------------------------------------------------
def test_symbols_are_one_gpt2_token_each():
    text = symbol_text(gpt2_tokenizer(), 4, "gpt2")
    assert text.ids == (257, 275, 269, 288) and text.newline == 198  # " a", " b", " c", " d", "\n"
    seqs = torch.tensor([[[0, 1, 2], [3, 3, 0]]])
    assert gpt2_tokenizer().encode(render([0, 1, 2]) + "\n" + render([3, 3, 0]) + "\n") == text.lines(seqs)[0].tolist()
    assert text.symbols(torch.tensor([[257, 288]])).tolist() == [[0, 3]]


def test_a_tokenizer_that_splits_symbols_is_refused_in_one_line():
    split = SimpleNamespace(encode=lambda s: [1, 2], prefix_token_id=0)
    with pytest.raises(HarnessError, match="one distinct token") as e:
        symbol_text(split, 4, "toy")
    assert "\n" not in str(e.value)
    with pytest.raises(HarnessError, match="vocab <= 26"):
        symbol_text(gpt2_tokenizer(), 27, "gpt2")


def test_wilson_interval():
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 32)[0] == 0.0 and wilson(0, 32)[1] == pytest.approx(0.1072, abs=1e-4)


# ---- rows ---------------------------------------------------------------------------------------
def test_rows_of_a_llama_pair(results):
    llm = results[results["model"] != "bigram"]
    assert set(llm["subtask"]) == SUBTASKS
    assert set(results.loc[results["model"] == "bigram", "subtask"]) == {"n=2", "n=3"}
    for (model, sub), block in llm.groupby(["model", "subtask"]):
        rows = block.set_index("metric")
        expected = {"valid_rate", "token_valid_rate"} | ({"train_seconds"} if sub.endswith("ft") else set())
        assert set(rows.index) == expected, (model, sub)
        assert rows.loc["valid_rate", "n"] == 8
        for metric in ("valid_rate", "token_valid_rate"):
            extra = rows.loc[metric, "extra"]
            assert extra["ci_low"] <= rows.loc[metric, "value"] <= extra["ci_high"], (model, sub, metric)
        shares = rows.loc["valid_rate", "value"]  # a binomial proportion over 8 samples: its standard error
        assert rows.loc["valid_rate", "stderr"] == pytest.approx(math.sqrt(shares * (1 - shares) / 7), abs=1e-12)
    pair = llm.pivot_table(index=["subtask", "metric"], columns="model", values="value")
    rates = pair.drop(index="train_seconds", level="metric")
    assert (rates["llama-scratch"] - rates["llama-hf"]).abs().max() <= 0.05  # same weights, same seeds


def test_same_seed_same_numbers_and_weights_unchanged():
    model = build("gpt2-scratch")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    head = model.module.lm_head
    first, second = run_task(model, n="2"), run_task(model, n="2")
    assert [(r.subtask, r.metric, r.value) for r in first if r.metric != "train_seconds"] == \
           [(r.subtask, r.metric, r.value) for r in second if r.metric != "train_seconds"]
    assert {r.subtask for r in first} == {"n=2 icl", "n=2 ft"}
    assert model.module.lm_head is head
    after = model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # ft trained a copy


@pytest.mark.parametrize("name", ["llama-scratch", "llama-hf", "gpt2-hf"])
def test_sampling_picks_only_the_symbol_tokens(name):
    model = build(name)
    allowed = [257, 275, 269, 288]
    prompt = torch.full((6, 3), 198)
    out = model.sample_batch(prompt, 10, 1.0, seed=3, allowed=allowed)
    assert out.shape == (6, 13) and torch.equal(out[:, :3], prompt)
    assert set(out[:, 3:].flatten().tolist()) <= set(allowed)
    assert torch.equal(out, model.sample_batch(prompt, 10, 1.0, seed=3, allowed=allowed))


def test_fine_tuning_lowers_the_loss_on_a_copy():
    model = build("llama-scratch")
    task = NGramRules(make_config(NGramRules, {**TINY, "ft_steps": "8", "ft_lr": "3e-3"}))
    text = symbol_text(model.tokenizer, 4, model.name)
    train = task.language(2, 0).sample(50, 0)
    tuned, losses = fine_tune(model, text, train, task, seed=0)
    assert tuned is not model.module and len(losses) == 8 and losses[-1] < losses[0]


# ---- refusals -----------------------------------------------------------------------------------
def test_models_that_are_neither_ladder_nor_causal_lm_are_refused():
    for name, weights in (("autograd-scratch", None), ("bert-scratch", "random:tiny")):
        spec = MODELS.get(name)
        model = spec.build(load_weights(spec.arch, weights, 0), "cpu")
        with pytest.raises(HarnessError, match="nor a causal LM") as e:
            NGramRules(make_config(NGramRules, TINY)).check(model)
        assert "\n" not in str(e.value)


def test_a_prompt_longer_than_the_model_and_bad_keys_are_refused():
    with pytest.raises(HarnessError, match=r"--set ngram-rules.icl_examples=\d") as e:
        NGramRules(make_config(NGramRules, {})).check(build("llama-scratch"))  # 8 x 33 tokens > 64
    assert "\n" not in str(e.value)
    for key, value in (("ft_steps", "-1"), ("llm_samples", "0"), ("ft_lr", "0")):
        with pytest.raises(HarnessError, match=f"--set ngram-rules.{key}="):
            NGramRules(make_config(NGramRules, {key: value})).validate()


# ---- report -------------------------------------------------------------------------------------
def test_report_draws_icl_and_ft_lines_beside_the_ladder(results, tmp_path):
    section = TASKS.get("ngram-rules").report_section(results, tmp_path / "figures", tmp_path)
    for label in ("llama-scratch icl", "llama-scratch ft", "llama-hf icl", "llama-hf ft"):
        assert f"| {label} | " in section
    assert "| bigram | " in section and "**Pretrained LLMs.**" in section
    assert section.index("| bigram |") < section.index("| llama-hf icl |") < section.index("| llama-hf ft |")
    assert (tmp_path / "figures" / "ngram_rules_by_order.png").stat().st_size > 0
    assert "](figures/ngram_rules_by_order.png)" in section and "Wilson" in section
