"""The real GPT-2 (openai-community/gpt2) in both implementations, where a local HF cache has it."""

import pytest

from harness.runner import RunPlan, run

HUB_ID = "openai-community/gpt2"


def _cached() -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(HUB_ID, "config.json"), str)


@pytest.mark.slow
@pytest.mark.skipif(not _cached(), reason=f"{HUB_ID} is not in the local Hugging Face cache (offline machine)")
def test_real_gpt2_is_at_parity_and_scores_wikitext(tmp_path):
    plan = RunPlan(models=["gpt2-scratch", "gpt2-hf"], tasks=["parity", "ppl"], weights=HUB_ID, limit=1,
                   results_dir=str(tmp_path))
    store, failures = run(plan)
    assert not failures
    rows = {(r.model, r.metric): r.value for r in store.rows}
    assert rows["gpt2-scratch", "max_abs_logit_diff"] <= 1e-5  # the fp32 norm; not measured here (offline)
    assert rows["gpt2-scratch", "greedy_tokens_equal"] == 1.0
    assert rows["gpt2-scratch", "word_perplexity"] == pytest.approx(rows["gpt2-hf", "word_perplexity"], rel=1e-5)
