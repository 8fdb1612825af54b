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


def test_compile_also_compiles_the_decode_copys_step(monkeypatch):
    """The adapter compiles its module in place and, for batch decoding, the input-major copy's step
    (what GPT-2's generate calls per token: hidden_states); recorded here, not built."""
    import torch

    from harness.generate import load_model

    model = load_model("gpt2-scratch", "random:tiny")
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append((fn.__name__, kw)) or fn)
    model.compile()
    assert calls == [("GPT2", {})]
    idx = torch.arange(4)[None, :]
    eager = model.module.generate(idx, 3, temperature=0.0)
    assert torch.equal(model.generate_batch(idx, 3), eager)
    assert calls[1:] == [("GPT2", {"dynamic": True}), ("hidden_states", {"dynamic": True})]


@pytest.mark.slow
def test_the_compiled_decode_step_decodes_the_eager_tokens():
    """~1 min on 2 CPU cores: inductor builds the tiny GPT-2's prompt and single-token graphs."""
    import torch

    from harness.generate import load_model

    model = load_model("gpt2-scratch", "random:tiny")
    idx = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(0))
    eager = model.generate_batch(idx, 20)
    model.compile()
    assert torch.equal(model.generate_batch(idx, 20), eager)
    assert torch.equal(model.generate_batch(idx[:1], 20), eager[:1])  # another batch size: a recompile, same tokens
