"""The mutation benchmark (tasks/mutants.py): every mutant caught, the rates computed from the rows.

Pairs are built directly at tiny sizes with a 1,000-token vocabulary and trained-scale weights
(initializer_range 0.2, so MLP pre-activations are O(1) and a GELU variant shows, as it does on the
committed run's trained GPT-2 checkpoint); norms jittered as the task does.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from reproductions import bert, gpt2, llama
from tasks.mutants import FAMILIES, MUTANTS, Mutants, MutantsConfig, evaluate, jitter_norms, mutants_table

SEQ_LEN = 12


def tiny_pair(family: str, init: float = 0.2) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(ours, reference, vocab) on identical seeded weights with jittered norms."""
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(**gpt2.GPT2Config.from_name("tiny").to_hf_kwargs(), initializer_range=init)
        ref_cls, ours_cls = transformers.GPT2LMHeadModel, gpt2.GPT2
    elif family == "llama":
        cfg = transformers.LlamaConfig(**llama.LlamaConfig.from_name("tiny").to_hf_kwargs(), initializer_range=init)
        ref_cls, ours_cls = transformers.LlamaForCausalLM, llama.Llama
    else:
        cfg = transformers.BertConfig(**bert.BertConfig.from_name("tiny", initializer_range=init).to_hf_kwargs())
        ref_cls, ours_cls = transformers.BertModel, bert.BertModel
    ref = ref_cls(cfg).eval()
    sd = jitter_norms(ref.state_dict(), 0.2, seed=0)
    ref.load_state_dict(sd)
    return ours_cls.from_hf(cfg, sd).eval(), ref, cfg.vocab_size


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pairs():
    return {family: tiny_pair(family) for family in FAMILIES}


def test_at_least_fifteen_mutants_over_three_families():
    assert len(MUTANTS) >= 15
    assert set(FAMILIES) == {"gpt2", "llama", "bert"}
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_is_caught_and_localised(mutant, pairs):
    ours, ref, vocab = pairs[mutant.family]
    outcome = evaluate(mutant, ours, ref, vocab, SEQ_LEN, seed=0, n_layer=2)
    assert outcome.caught, f"{mutant.name} not caught"
    assert outcome.localised, f"{mutant.name}: first divergence {outcome.first}, expected {mutant.site}[{mutant.block}]"
    assert outcome.top, "a caught mutant must come with suspects"


def test_mutants_leave_the_original_untouched(pairs):
    from harness.api.diagnosis import diagnose

    ours, ref, vocab = pairs["gpt2"]
    for mutant in [m for m in MUTANTS if m.family == "gpt2"][:3]:
        evaluate(mutant, ours, ref, vocab, SEQ_LEN, seed=0, n_layer=2)
    assert not diagnose(ours, ref, "gpt2", vocab, SEQ_LEN, 0).diverged


def test_unknown_mutant_is_refused_in_one_line():
    from harness.api import HarnessError

    with pytest.raises(HarnessError, match="unknown mutant"):
        Mutants(MutantsConfig(mutants=("gpt2-no-such-bug",))).validate()


def test_task_rows_and_rates_through_the_runner(tmp_path):
    """The task through `harness run` on a tiny local GPT-2 checkpoint: per-mutant rows, rates = their means."""
    from harness.api import load_results
    from harness.runner import RunPlan, run

    ckpt = tmp_path / "ckpt"
    _, ref, _ = tiny_pair("gpt2")
    ref.save_pretrained(ckpt)
    chosen = "gpt2-no-causal-mask,gpt2-untied-head"
    plan = RunPlan(models=["gpt2-scratch"], tasks=["mutants"], weights=str(ckpt), seed=0,
                   results_dir=str(tmp_path / "results"),
                   overrides={"mutants": {"mutants": chosen, "seq_len": str(SEQ_LEN)}})
    store, failures = run(plan)
    assert failures == []
    df = load_results(str(tmp_path / "results"))
    values = {(r.subtask, r.metric): r.value for r in df.itertuples()}
    assert values[("", "clean_diverged")] == 0.0
    for metric in ("caught", "localised", "diagnosed"):
        per = [values[(name, metric)] for name in chosen.split(",")]
        assert values[("", f"{metric}_rate")] == pytest.approx(sum(per) / len(per))
    assert values[("", "caught_rate")] == 1.0
    table = mutants_table(df)
    assert "| gpt2-no-causal-mask |" in table and "caught" in table
