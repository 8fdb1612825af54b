"""The public API (harness/api): typed capabilities, one place for reproduction errors, one tolerance
rule, plugins found by the registry, and the layers the code keeps."""

import inspect
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.api import (
    MODELS,
    Capability,
    Generator,
    HarnessError,
    ModelAdapter,
    ModelSpec,
    Scorer,
    allowed_difference,
    load_plugins,
    load_weights,
    noise_slack,
)
from harness.api.capabilities import PROTOCOLS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("harness", "tasks", "reproductions")


@pytest.fixture(scope="module")
def gpt2():
    spec = MODELS.get("gpt2-scratch")
    return spec.build(load_weights(spec.arch, "random:tiny", 0), "cpu")


def test_require_returns_the_typed_view_or_one_line(gpt2):
    assert gpt2.require(Scorer, task="ppl") is gpt2
    assert gpt2.require(Capability.SCORE, task="ppl") is gpt2
    assert gpt2.can(Generator) and not gpt2.can(Capability.SEQ2SEQ)
    with pytest.raises(HarnessError) as e:
        gpt2.require(Capability.SEQ2SEQ, task="seq2seq")
    assert "gpt2-scratch" in str(e.value) and "'seq2seq'" in str(e.value) and "\n" not in str(e.value)


def test_every_capability_has_one_protocol():
    assert set(PROTOCOLS) == set(Capability)


def _protocol_methods(protocol: type) -> set[str]:
    names = set()
    for klass in protocol.__mro__:
        if klass.__name__ in ("_Model", "Protocol", "Generic", "object"):
            continue
        names |= {n for n, v in vars(klass).items() if inspect.isfunction(v) and not n.startswith("_")}
    return names


def _adapter_classes() -> list[type]:
    load_plugins()
    todo, seen = list(ModelAdapter.__subclasses__()), []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo += cls.__subclasses__()
    return [c for c in seen if c.capabilities and c.__module__.startswith("harness.models")]


DEFAULTS_THAT_SERVE = {"token_logprobs", "reference_layout"}  # ModelAdapter's versions are correct as they are


@pytest.mark.parametrize("cls", _adapter_classes(), ids=lambda c: f"{c.__module__.split('.')[-1]}.{c.__name__}")
def test_adapters_implement_what_they_declare(cls):
    for capability in cls.capabilities:
        for method in _protocol_methods(PROTOCOLS[capability]):
            assert hasattr(cls, method), f"{cls.__name__} declares {capability.value} but has no {method}"
            if method not in DEFAULTS_THAT_SERVE:
                assert getattr(cls, method) is not getattr(ModelAdapter, method, None), (cls, method)


def test_a_reproduction_value_error_becomes_one_line_in_build(gpt2):
    def refuse(weights, device):
        raise ValueError("rope scaling 'yarn' is not implemented\n(details follow)")

    spec = ModelSpec(gpt2.info, MODELS.get("gpt2-scratch").arch, refuse)
    with pytest.raises(HarnessError) as e:
        spec.build(gpt2.weights, "cpu")
    assert str(e.value) == "gpt2-scratch cannot load weights 'random:tiny': rope scaling 'yarn' is not implemented"


def test_one_tolerance_rule():
    assert noise_slack(None, float("nan")) == 0.0
    assert noise_slack(0.01) == pytest.approx(1.96 * 0.01)
    assert noise_slack(0.03, 0.04) == pytest.approx(1.96 * 0.05)
    assert allowed_difference(0.5, 0.03, 0.04) == 0.5
    assert allowed_difference(0.0, 0.03, None) == pytest.approx(1.96 * 0.03)


def test_report_and_gate_allow_the_same_noise():
    from harness.api import MetricSpec
    from harness.gate import compare
    from harness.report import _pair_allowed

    spec = MetricSpec(higher_is_better=True)
    base = pd.Series({"model": "m", "weights": "w", "task": "t", "subtask": "", "metric": "acc", "value": 0.8,
                      "stderr": 0.03, "higher_is_better": True})
    current = pd.DataFrame([{**base.to_dict(), "value": 0.75, "stderr": 0.04}])
    check = compare(base, current, {})
    assert check.allowed == pytest.approx(_pair_allowed(spec, 0.8, 0.03, 0.04)) == pytest.approx(1.96 * 0.05)
    assert check.status == "ok"  # 0.05 worse, inside 0.098


def _harness(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_a_plugin_task_runs_from_harness_plugins(tmp_path):
    """examples/plugin_task.py, the worked example of docs/architecture.md, through the real CLI."""
    assert len((ROOT / "examples" / "plugin_task.py").read_text().splitlines()) < 40
    out = _harness("run", "--model", "gpt2-scratch,gpt2-hf", "--tasks", "sentence-logprob", "--weights",
                   "random:tiny", "--results-dir", str(tmp_path), env={"HARNESS_PLUGINS": "examples/plugin_task.py"})
    assert out.returncode == 0, out.stderr
    from harness.api import load_results

    df = load_results(tmp_path).set_index("model")["value"]
    assert set(df.index) == {"gpt2-scratch", "gpt2-hf"}
    assert math.isfinite(df["gpt2-scratch"]) and df["gpt2-scratch"] < 0
    assert abs(df["gpt2-scratch"] - df["gpt2-hf"]) <= 1e-5


def test_a_plugin_pair_reaches_parity(tmp_path):
    """examples/plugin_pair.py: our Llama reproduction held to transformers' Mistral, by module name."""
    assert len((ROOT / "examples" / "plugin_pair.py").read_text().splitlines()) < 60
    out = _harness("run", "--model", "mistral-scratch", "--tasks", "parity", "--results-dir", str(tmp_path),
                   env={"HARNESS_PLUGINS": "examples.plugin_pair"})
    assert out.returncode == 0, out.stderr
    from harness.api import load_results

    values = load_results(tmp_path).set_index("metric")["value"]
    assert values["max_abs_logit_diff"] <= 1e-5 and values["max_abs_grad_diff"] <= 1e-5
    assert values["greedy_tokens_equal"] == 1.0


@pytest.mark.parametrize("plugin", ["examples.no_such_plugin", "examples/no_such_plugin.py"])
def test_a_plugin_that_does_not_import_is_one_line_exit_2(plugin):
    out = _harness("list", "tasks", env={"HARNESS_PLUGINS": plugin})
    assert out.returncode == 2
    assert "HARNESS_PLUGINS" in out.stderr and "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.parametrize("package", PACKAGES)
def test_no_python_file_over_600_lines(package):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert long == {}


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_import_layers_hold():
    out = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
