import math

import pytest
import torch

from harness.api import (
    MODELS,
    TASKS,
    HarnessError,
    Recipe,
    RunContext,
    UnknownNameError,
    load_plugins,
    load_results,
    load_weights,
    make_config,
    parse_overrides,
)
from harness.models.charlm import RUNGS, LadderModel
from harness.runner import RunPlan, run
from tasks.ngram_rules import NGramRules, NGramRulesConfig, derive_seed, pca2
from tasks.ngram_rules_lang import RuleLanguage, RuleSpec

load_plugins()
TINY = dict(n="2,3", train_samples="200", samples="40", eval_samples="40", steps="25", batch_size="16")
TINY_MODELS = ["bigram", "trigram", "mlp-ngram", "char-gpt-scratch", "char-gpt-hf"]
METRICS = {"valid_rate", "token_valid_rate", "nll", "entropy_bound", "train_seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ladder(name: str, weights: str | None = None) -> LadderModel:
    spec = MODELS.get(name)
    return spec.build(load_weights(spec.arch, weights, 0), "cpu")


def ctx(seed: int = 0) -> RunContext:
    return RunContext(seed, None, "cpu", lambda m: None, lambda it, total=None, description="": it)


def run_task(model: str, seed: int = 0, **overrides: str) -> list:
    task = NGramRules(make_config(NGramRules, {**TINY, **overrides}))
    m = ladder(model)
    task.check(m)
    return list(task.run(m, ctx(seed)))


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    results = tmp_path_factory.mktemp("ngram_rules")
    plan = RunPlan(models=TINY_MODELS, tasks=["ngram-rules"], seed=0, results_dir=str(results),
                   overrides={"ngram-rules": TINY})
    _, failures = run(plan)
    assert failures == []
    return load_results(results)


# ---- config -------------------------------------------------------------------------------------
def test_set_n_parses_to_a_tuple_of_ints():
    overrides = parse_overrides(["ngram-rules.n=2,3", "ngram-rules.steps=7"], TASKS.names())
    config = make_config(NGramRules, overrides["ngram-rules"])
    assert config.n == (2, 3) and config.steps == 7
    assert NGramRulesConfig().n == (2, 3, 4, 6, 8) and NGramRulesConfig().rule == "lag"


def test_unknown_key_and_bad_order_are_one_line_errors():
    with pytest.raises(UnknownNameError, match="ngram-rules.train_samples"):
        make_config(NGramRules, {"k": "3"})
    with pytest.raises(HarnessError, match="n=1") as e:
        run_task("bigram", n="1")
    assert "\n" not in str(e.value)


# ---- the models behind the adapter ------------------------------------------------------------
@pytest.mark.parametrize("weights", ["owner/name", "not-a-checkpoint", "random:huge", "."], ids=str)
def test_ladder_weights_other_than_random_are_one_line_errors(weights):
    with pytest.raises(HarnessError) as e:
        load_weights(MODELS.get("rnn").arch, weights, 0)
    assert "\n" not in str(e.value)


def test_ladder_models_refuse_to_tokenize_text():
    with pytest.raises(HarnessError, match="trained from scratch by its task"):
        ladder("char-gpt-scratch").tokenizer.encode("To be, or not to be")


def test_random_sizes_pick_hyper_parameters():
    tiny, small = ladder("rnn"), ladder("rnn", "random:small")
    assert tiny.weights.identity == "random:tiny" and small.weights.identity == "random:small"
    assert small.new_lm(5, 8, 0).config.n_hidden > tiny.new_lm(5, 8, 0).config.n_hidden


@pytest.mark.parametrize("name", [r.name for r in RUNGS], ids=str)
def test_new_lm_is_seeded_and_leaves_the_global_rng_alone(name):
    model = ladder(name)
    state = torch.random.get_rng_state()
    a, b = model.new_lm(5, 12, seed=3), model.new_lm(5, 12, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    x = torch.randint(5, (2, 12), generator=torch.Generator().manual_seed(0))
    assert a.logits(x).shape == (2, 12, 5)
    torch.testing.assert_close(a.logits(x), b.logits(x))


def test_char_gpt_pair_starts_identical_and_trains_alike():
    scratch, hf = ladder("char-gpt-scratch"), ladder("char-gpt-hf")
    a, b = scratch.new_lm(4, 16, seed=1), hf.new_lm(4, 16, seed=1)
    x = RuleLanguage(RuleSpec(n=3, seq_len=16)).sample(32, 0)
    torch.testing.assert_close(a.logits(x), b.logits(x), atol=1e-5, rtol=0)
    recipe = Recipe(steps=20, batch_size=8, block=16, lr=3e-3, seed=5)
    losses_a, losses_b = scratch.train(a, x, recipe), hf.train(b, x, recipe)
    assert losses_a[0] == pytest.approx(losses_b[0], abs=1e-5)
    assert max(abs(p - q) for p, q in zip(losses_a, losses_b)) < 1e-3


def test_tasks_refuse_models_that_are_not_ladder_rungs():
    autograd = MODELS.get("autograd-scratch")
    model = autograd.build(load_weights(autograd.arch, None, 0), "cpu")
    with pytest.raises(HarnessError, match="ngram-rules trains its own models"):
        NGramRules(NGramRulesConfig()).check(model)


# ---- scoring ------------------------------------------------------------------------------------
def test_rows_are_well_formed(tiny_results):
    df = tiny_results
    assert set(df["model"]) == set(TINY_MODELS) and set(df["subtask"]) == {"n=2", "n=3"}
    for (model, subtask), block in df.groupby(["model", "subtask"]):
        assert set(block["metric"]) == METRICS, (model, subtask)
        values = block.set_index("metric")["value"]
        assert 0 <= values["valid_rate"] <= values["token_valid_rate"] <= 1
        assert values["nll"] >= values["entropy_bound"] - 0.05 and values["train_seconds"] >= 0
    bound = df[df["metric"] == "entropy_bound"].groupby("subtask")["value"].nunique()
    assert (bound == 1).all()  # every model is scored against the same language


def test_bigram_learns_the_order_two_rule_and_nothing_more(tiny_results):
    rows = tiny_results[tiny_results["model"] == "bigram"].set_index(["subtask", "metric"])["value"]
    assert rows[("n=2", "valid_rate")] == 1.0 and rows[("n=2", "token_valid_rate")] == 1.0
    assert rows[("n=2", "nll")] == pytest.approx(rows[("n=2", "entropy_bound")], abs=0.01)
    assert rows[("n=3", "valid_rate")] < 0.05
    assert rows[("n=3", "nll")] == pytest.approx(math.log(4), abs=0.02)  # one symbol short: no information


def test_same_seed_same_numbers_other_seed_other_numbers():
    first, again, other = (run_task("mlp-ngram", seed=s, n="3") for s in (0, 0, 1))
    values = lambda rows: [(m.metric, m.value) for m in rows if m.metric != "train_seconds"]  # noqa: E731
    assert values(first) == values(again)
    assert values(first) != values(other)


def test_seeds_average_the_runs_of_consecutive_seeds():
    single = {s: {m.metric: m for m in run_task("mlp-ngram", seed=s, n="3")} for s in (5, 6)}
    both = {m.metric: m for m in run_task("mlp-ngram", seed=5, n="3", seeds="2")}
    assert set(both) == METRICS
    for name, row in both.items():
        values = [single[s][name].value for s in (5, 6)]
        assert row.extra["seeds"] == [5, 6] and row.subtask == "n=3" and len(row.extra["per_seed"]) == 2
        assert row.extra["ci_low"] <= row.value <= row.extra["ci_high"]
        if name != "train_seconds":  # wall time is measured afresh
            assert row.extra["per_seed"] == values and row.value == pytest.approx(sum(values) / 2)
    nll = [single[s]["nll"].value for s in (5, 6)]
    half_width = both["nll"].extra["ci_high"] - both["nll"].value
    assert half_width == pytest.approx(12.706 * abs(nll[0] - nll[1]) / 2, rel=1e-3)  # t(0.975, 1 dof)
    assert both["valid_rate"].n == 2 * single[5]["valid_rate"].n
    assert both["valid_rate"].extra["rule_seed"] == [single[s]["valid_rate"].extra["rule_seed"] for s in (5, 6)]
    assert 0 <= both["valid_rate"].extra["ci_low"] and both["valid_rate"].extra["ci_high"] <= 1


def test_seeds_below_one_are_refused_before_any_work():
    with pytest.raises(HarnessError, match="ngram-rules.seeds must be >= 1") as e:
        NGramRules(make_config(NGramRules, {"seeds": "0"})).validate()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("workers", "0", "ngram-rules.workers must be >= 1"),
    ("schedule", "linear", "ngram-rules.schedule must be one of constant, cosine"),
    ("rule", "random", "rule must be one of table, lag"),
])
def test_bad_workers_schedule_and_rule_are_refused_before_any_work(key, value, message):
    with pytest.raises(HarnessError, match=message) as e:
        NGramRules(make_config(NGramRules, {key: value})).validate()
    assert "\n" not in str(e.value)


def test_worker_processes_give_the_rows_of_one_process():
    """(order, seed) jobs in two spawned workers: the same rows, in the same order, as in-process."""
    values = lambda rows: [(m.subtask, m.metric, m.value, m.extra.get("per_seed")) for m in rows  # noqa: E731
                           if m.metric != "train_seconds"]
    alone = run_task("char-gpt-scratch", seed=4, seeds="2", steps="10")
    shared = run_task("char-gpt-scratch", seed=4, seeds="2", steps="10", workers="2")
    assert values(shared) == values(alone) and len(alone) == 2 * len(METRICS)


def test_the_table_rule_is_still_there():
    rows = {m.metric: m.value for m in run_task("trigram", n="3", rule="table")}
    assert rows["valid_rate"] == 1.0  # a counting model of the rule's own order learns either rule


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "train", 2) == derive_seed(0, "train", 2)
    assert len({derive_seed(s, what, n) for s in (0, 1) for what in ("train", "init") for n in (2, 3)}) == 8


def test_pca2_recovers_a_plane():
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0)) @ torch.randn(2, 6)
    coords = pca2(x)
    assert coords.shape == (50, 2)
    torch.testing.assert_close(torch.cdist(coords, coords), torch.cdist(x.double(), x.double()))


def test_report_section_writes_markdown_and_figures(tiny_results, tmp_path):
    section = TASKS.get("ngram-rules").report_section(tiny_results, tmp_path / "figures", tmp_path)
    assert "| model | N=2 | N=3 |" in section and "| bigram | 1.000 |" in section
    assert "*entropy bound*" in section and "**Reading.**" in section
    for name in ("by_order", "curves", "bigram", "mlp", "attention"):
        assert (tmp_path / "figures" / f"ngram_rules_{name}.png").stat().st_size > 0
        assert f"](figures/ngram_rules_{name}.png)" in section


def test_report_draws_seed_intervals(tmp_path):
    plan = RunPlan(models=["bigram", "mlp-ngram"], tasks=["ngram-rules"], seed=0, results_dir=str(tmp_path / "r"),
                   overrides={"ngram-rules": {**TINY, "seeds": "2"}})
    _, failures = run(plan)
    assert failures == []
    rows = load_results(tmp_path / "r")
    assert set(rows["subtask"]) == {"n=2", "n=3"} and len(rows) == 2 * 2 * len(METRICS)  # one row per seed pair
    section = TASKS.get("ngram-rules").report_section(rows, tmp_path / "figures", tmp_path)
    assert "| bigram | 1.000 [1.00, 1.00] |" in section  # exact at N=2 for both seeds: a zero-width interval
    assert "95% Student-t interval over 2 seeds" in section


@pytest.mark.slow
def test_default_budget_shows_the_ladder():
    """Counts stop at their order, the MLP at its window (context 3: N <= 4)."""
    task = NGramRules(NGramRulesConfig(n=(2, 3, 4, 6)))
    valid = {}
    for name in ("bigram", "trigram", "mlp-ngram"):
        for m in task.run(ladder(name), ctx()):
            if m.metric == "valid_rate":
                valid[(name, m.subtask)] = m.value
    assert [valid[("bigram", f"n={n}")] > 0.9 for n in (2, 3, 4, 6)] == [True, False, False, False]
    assert [valid[("trigram", f"n={n}")] > 0.9 for n in (2, 3, 4, 6)] == [True, True, False, False]
    assert [valid[("mlp-ngram", f"n={n}")] > 0.5 for n in (2, 3, 4, 6)] == [True, True, True, False]
