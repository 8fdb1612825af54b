"""`harness generate`: greedy gpt2-scratch == gpt2-hf (transformers' generate), seeded sampling repeats."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.api import HarnessError
from harness.cli import main
from harness.generate import GenerateConfig, continuation, load_model

DEFAULT = Path(__file__).resolve().parents[2] / "harness" / "assets" / "gpt2-default"
WEIGHTS = [pytest.param("random:tiny", id="random-tiny")]
if (DEFAULT / "model.safetensors").is_file():
    WEIGHTS.append(pytest.param(str(DEFAULT), id="trained-default"))


pytestmark = pytest.mark.usefixtures("one_thread")


def generate(capsys, *args: str) -> str:
    assert main(["generate", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("weights", WEIGHTS)
def test_greedy_scratch_equals_hf(capsys, weights):
    args = ["--weights", weights, "--prompt", "The meaning of life is", "--max-new-tokens", "12"]
    ours = generate(capsys, "--model", "gpt2-scratch", *args)
    theirs = generate(capsys, "--model", "gpt2-hf", *args)
    assert ours == theirs and ours.strip()


@pytest.mark.parametrize("model", ["gpt2-scratch", "gpt2-hf"])
def test_sampling_is_reproducible_from_the_seed(model):
    adapter = load_model(model, "random:tiny")
    config = lambda seed: GenerateConfig(10, temperature=1.0, top_p=0.95, seed=seed)
    sample = lambda seed: continuation(adapter, "Hello", config(seed))
    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_top_k_1_is_greedy():
    adapter = load_model("gpt2-scratch", "random:tiny")
    greedy = continuation(adapter, "Hello", GenerateConfig(8))
    assert continuation(adapter, "Hello", GenerateConfig(8, temperature=0.7, top_k=1, seed=5)) == greedy


def test_empty_prompt_starts_from_end_of_text():
    adapter = load_model("gpt2-hf", "random:tiny")
    assert len(adapter.tokenizer.encode(continuation(adapter, "", GenerateConfig(4)))) >= 1


def test_bad_requests_fail_in_one_line(capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                "gpt2-scratch",
                "--weights",
                "random:tiny",
                "--prompt",
                "Hi",
                "--max-new-tokens",
                "100",
            ]
        )
        == 2
    )
    assert "exceeds gpt2-scratch's context of 64; use --max-new-tokens 63 or less" in capsys.readouterr().err
    with pytest.raises(HarnessError, match="--temperature -1"):
        GenerateConfig(temperature=-1)
    assert main(["generate", "--model", "gpt2-nope", "--prompt", "Hi"]) == 2
    assert "unknown model 'gpt2-nope'; known models:" in capsys.readouterr().err
