"""`harness run --compile` (issue 17): torch.compile on the models that have a reference, refused up front
without a C++ compiler on CPU, and visible in every row's config so that compiled and eager runs never
compare as the same plan."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.runner import RunPlan, _config_dict, plan_record

RUN = ["run", "--model", "gpt2-scratch,gpt2-hf", "--tasks", "parity", "--weights", "random:tiny", "--compile"]


def test_compile_without_a_cpp_compiler_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("harness.runner.load_weights", lambda *a, **k: pytest.fail("weights loaded before the check"))
    assert main([*RUN, "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--compile on CPU needs a C++ compiler" in err and "g++" in err
    assert not (tmp_path / "r").exists()


def test_compile_is_in_the_row_config_and_plan_only_when_set():
    from tasks.parity import Parity

    task = Parity(Parity.config_class())
    eager, compiled = RunPlan(["gpt2-scratch"], ["parity"]), RunPlan(["gpt2-scratch"], ["parity"], compile=True)
    assert "compile" not in _config_dict(task, eager) and "compile" not in plan_record(eager, {"parity": task})
    assert _config_dict(task, compiled)["compile"] is True and plan_record(compiled, {"parity": task})["compile"]


@pytest.mark.slow
def test_a_compiled_scratch_model_keeps_parity_with_its_eager_reference(tmp_path):
    """~1-2 min on 2 CPU cores: inductor builds the kernels of the tiny GPT-2's forward and backward."""
    assert main([*RUN, "--results-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for f in tmp_path.rglob("*.jsonl") for line in f.read_text().splitlines()]
    scratch = {r["metric"]: r for r in rows if r["model"] == "gpt2-scratch"}
    assert all(r["config"]["compile"] for r in rows)
    assert scratch["max_abs_logit_diff"]["value"] <= 1e-5
    assert scratch["greedy_tokens_equal"]["value"] == 1.0
