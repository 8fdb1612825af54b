import pytest

from harness.runner import RunPlan, run


def test_tiny_gpt2_pair_is_at_parity(tiny_run):
    rows = {r.metric: r for r in tiny_run.rows if r.task == "parity"}
    assert set(rows) == {"max_abs_logit_diff", "max_abs_grad_diff", "greedy_tokens_equal"}
    assert rows["max_abs_logit_diff"].value <= 1e-5
    assert rows["max_abs_grad_diff"].value <= 1e-5
    assert rows["greedy_tokens_equal"].value == 1.0
    assert all(r.model == "gpt2-scratch" for r in rows.values())  # the reference is not compared to itself


def test_parity_detects_a_broken_reproduction(tmp_path, monkeypatch):
    """A perturbed scratch weight must show up as a logit and gradient difference above 1e-5."""
    from harness.models import causal

    original = causal._Scratch.__init__

    def broken_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        with __import__("torch").no_grad():
            self.module.transformer.h[0].mlp.c_fc.bias.add_(1e-2)

    monkeypatch.setattr(causal._Scratch, "__init__", broken_init)
    store, failures = run(
        RunPlan(models=["gpt2-scratch"], tasks=["parity"], weights="random:tiny", results_dir=str(tmp_path))
    )
    rows = {r.metric: r.value for r in store.rows}
    assert not failures
    assert rows["max_abs_logit_diff"] > 1e-5 and rows["max_abs_grad_diff"] > 1e-5


@pytest.mark.slow
def test_real_124m_config_is_at_parity(tmp_path):
    store, failures = run(
        RunPlan(models=["gpt2-scratch"], tasks=["parity"], weights="random:gpt2", results_dir=str(tmp_path))
    )
    rows = {r.metric: r.value for r in store.rows}
    assert not failures
    assert rows["max_abs_logit_diff"] <= 1e-5 and rows["max_abs_grad_diff"] <= 1e-5
    assert rows["greedy_tokens_equal"] == 1.0
