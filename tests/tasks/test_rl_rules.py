"""rl-rules on a tiny budget, and the parity of every RL pair with TRL (<= 1e-6, fp32)."""

import pytest
import torch

from harness.api import (
    MODELS,
    HarnessError,
    RunContext,
    load_plugins,
    load_results,
    load_weights,
    make_config,
)
from harness.runner import RunPlan, run
from tasks.rl_rules import RLRules, rl_parity

pytest.importorskip("trl")
load_plugins()
TINY = dict(pretrain_samples="64", pretrain_steps="5", steps="3", prompts_per_step="2", group_size="2",
            eval_samples="32", dpo_prompts="16", dpo_batch="4", bootstrap="50", seq_len="8")
MODELS_RL = ["grpo-scratch", "grpo-trl", "rloo-scratch", "rloo-trl", "dpo-scratch", "dpo-trl", "ppo-scratch"]
METRICS = {"valid_rate_before", "valid_rate_after", "reward_mean", "kl_to_ref"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(name: str):
    spec = MODELS.get(name)
    return spec.build(load_weights(spec.arch, None, 0), "cpu")


def ctx() -> RunContext:
    return RunContext(0, None, "cpu", lambda m: None, lambda it, total=None, description="": it)


def run_task(name: str, **overrides: str) -> dict:
    task = RLRules(make_config(RLRules, {**TINY, **overrides}))
    task.validate()
    model = build(name)
    task.check(model)
    return {m.metric: m for m in task.run(model, ctx())}


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "dpo"])
def test_parity_with_trl_within_1e6(algorithm):
    loss, grad, detail = rl_parity(build(f"{algorithm}-scratch"), build(f"{algorithm}-trl"), seed=0)
    assert loss <= 1e-6 and grad <= 1e-6, detail["configs"]
    losses = [x for d in detail["configs"].values() for x in d["losses"]]
    assert len(set(losses)) > 1  # the SGD steps moved the policy: later losses differ from the first


@pytest.fixture(scope="module")
def tiny_rows():
    return {name: run_task(name) for name in MODELS_RL}


def test_every_model_yields_the_metrics_with_intervals_and_a_curve(tiny_rows):
    for name, rows in tiny_rows.items():
        assert set(rows) == METRICS, name
        for metric in ("valid_rate_before", "valid_rate_after", "reward_mean"):
            row = rows[metric]
            assert row.extra["ci_low"] <= row.value <= row.extra["ci_high"] and row.stderr is not None, (name, metric)
        assert len(rows["reward_mean"].extra["reward_curve"]) == 3
        assert rows["kl_to_ref"].value >= -1e-6


def test_a_pair_starts_from_the_same_pretrained_policy(tiny_rows):
    for algorithm in ("grpo", "rloo", "dpo"):
        ours, theirs = tiny_rows[f"{algorithm}-scratch"], tiny_rows[f"{algorithm}-trl"]
        assert ours["valid_rate_before"].value == theirs["valid_rate_before"].value
        assert ours["reward_mean"].extra["reward_curve"][0] == theirs["reward_mean"].extra["reward_curve"][0]


def test_same_seed_same_numbers(tiny_rows):
    again = run_task("grpo-scratch")
    assert {k: v.value for k, v in again.items()} == {k: v.value for k, v in tiny_rows["grpo-scratch"].items()}


def test_runner_parity_rows_for_a_pair_and_none_for_ppo(tmp_path):
    plan = RunPlan(models=["dpo-scratch", "dpo-trl", "ppo-scratch"], tasks=["parity"], seed=0,
                   results_dir=str(tmp_path))
    _, failures = run(plan)
    assert failures == []
    rows = load_results(tmp_path)
    assert set(rows["model"]) == {"dpo-scratch"}
    assert set(rows["metric"]) == {"max_abs_loss_diff", "max_abs_grad_diff"}
    assert (rows["value"] <= 1e-6).all()


@pytest.mark.parametrize("overrides, message", [
    ({"reward": "length"}, "reward"),
    ({"prompt_len": "1", "n": "3"}, "prompt_len"),
    ({"group_size": "1"}, "group_size"),
    ({"loss_type": "mean"}, "loss_type"),
])
def test_bad_config_is_one_line(overrides, message):
    task = RLRules(make_config(RLRules, {**TINY, **overrides}))
    with pytest.raises(HarnessError, match=message):
        task.validate()


def test_a_language_model_is_refused_in_one_line():
    with pytest.raises(HarnessError, match="rl-rules fine-tunes its own policy"):
        RLRules(make_config(RLRules, TINY)).check(build("char-gpt-scratch"))


def test_bootstrap_interval_brackets_the_mean():
    from tasks.rl_rules import bootstrap

    low, high, se = bootstrap(torch.tensor([0.0, 1.0] * 50, dtype=torch.float64), 500, 0)
    assert low < 0.5 < high and 0.03 < se < 0.07  # sqrt(0.25 / 100) = 0.05
