import pandas as pd
import pytest

from harness.api import (
    MODELS,
    TASKS,
    HarnessError,
    RunContext,
    UnknownNameError,
    load_plugins,
    load_weights,
    make_config,
)
from harness.models.charlm import AUTOGRAD_MODELS
from tasks.autograd_fit import AutogradFit

load_plugins()
NAMES = [name for name, *_ in AUTOGRAD_MODELS]


def run_task(model: str, seed: int = 0, **overrides: str) -> list:
    spec = MODELS.get(model)
    adapter = spec.build(load_weights(spec.arch, None, 0), "cpu")
    task = AutogradFit(make_config(AutogradFit, overrides))
    task.check(adapter)
    ctx = RunContext(seed, None, "cpu", lambda m: None, lambda it, total=None, description="": it)
    return list(task.run(adapter, ctx))


@pytest.fixture(scope="module")
def rows() -> dict[str, list]:
    return {name: run_task(name) for name in NAMES}


def test_rows_are_well_formed(rows):
    for metrics in rows.values():
        subtasks = {(m.metric, m.subtask) for m in metrics}
        assert ("abs_param_error", "line/sgd/a") in subtasks and ("final_loss", "quadratic/adam") in subtasks
        assert len(metrics) == 2 * (3 + 1) + 2 * (2 + 1)  # per optimiser: line a, b + loss; quadratic w1, w2, b + loss
        losses = [m for m in metrics if m.metric == "final_loss"]
        assert all(len(m.extra["loss_curve"]) == 300 for m in losses)


def test_every_method_fits_the_truth(rows):
    for metrics in rows.values():
        for m in metrics:
            assert m.value < (1e-3 if m.metric == "abs_param_error" else 1e-6), (m.subtask, m.metric)
            if m.metric == "abs_param_error":
                assert m.value == pytest.approx(abs(m.extra["value"] - m.extra["truth"]))


def test_our_engine_matches_torch(rows):
    ours, torch_raw, torch_nn = (rows[name] for name in NAMES)
    for a, b, c in zip(ours, torch_raw, torch_nn):
        assert a.subtask == b.subtask == c.subtask
        assert a.value == pytest.approx(b.value, abs=1e-9) and a.value == pytest.approx(c.value, abs=1e-9)


def test_same_seed_same_numbers():
    first, again, other = (run_task("autograd-scratch", seed=s, problems="line") for s in (0, 0, 1))
    assert [m.value for m in first] == [m.value for m in again]
    assert [m.value for m in first] != [m.value for m in other]


def test_unknown_problem_or_optimizer_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="known: line, quadratic"):
        run_task("autograd-torch", problems="cubic")
    with pytest.raises(UnknownNameError, match="known: sgd, adam"):
        run_task("autograd-torch", optimizers="rmsprop")


def test_refuses_other_models():
    spec = MODELS.get("bigram")
    with pytest.raises(HarnessError, match="autograd-fit runs its own fitters"):
        AutogradFit(AutogradFit.config_class()).check(spec.build(load_weights(spec.arch, None, 0), "cpu"))


def test_pairing_and_weights():
    assert MODELS.get("autograd-scratch").info.reference == "autograd-torch"
    with pytest.raises(HarnessError):
        load_weights(MODELS.get("autograd-torch").arch, "some/hub-id", 0)


def test_report_section_writes_the_table_and_the_curves(rows, tmp_path):
    history = pd.DataFrame([
        dict(model=name, weights="random:tiny", task="autograd-fit", subtask=m.subtask, metric=m.metric,
             value=m.value, extra=m.extra, created_at="2026-01-01T00:00:00+00:00")
        for name, metrics in rows.items() for m in metrics
    ])
    section = TASKS.get("autograd-fit").report_section(history, tmp_path / "figures", tmp_path)
    assert "| line | sgd | ours | a |" in section and "| quadratic | adam | torch-nn | b |" in section
    assert "](figures/autograd_fit_curves.png)" in section
    assert (tmp_path / "figures" / "autograd_fit_curves.png").stat().st_size > 0
