"""`harness diagnose` (harness/diagnose.py) and its core (harness/api/diagnosis/).

The CLI runs on `--weights random:tiny` (2 layers, width 32); the core tests on tiny pairs with a
1,000-token vocabulary. The examples of docs/bring-your-own.md must be pointed at their planted bugs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.api.diagnosis import SITES, diagnose, discover
from harness.cli import main
from tests.tasks.test_mutants import tiny_pair

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt() -> str:
    """The registered random tiny GPT-2 (2 layers, width 32, GPT-2's vocabulary), as users would run it."""
    return "random:tiny"


def _run(*argv: str) -> int:
    return main(["diagnose", *argv, "--seq-len", "12"])


def _check_schema(report: dict) -> None:
    assert set(report) == {"diverged", "first", "sites", "suspects"}
    assert isinstance(report["diverged"], bool) and isinstance(report["suspects"], list)
    for row in report["sites"]:
        assert set(row) == {"site", "block", "module", "max_abs_diff", "rel_diff"}
        assert row["site"] in SITES
        assert (row["block"] is None) == (row["site"] in ("embed", "final_norm", "logits"))
    if report["first"] is not None:
        assert set(report["first"]) == {"site", "block", "max_abs_diff", "rel_diff"}


def test_clean_pair_exit_0_json_and_plot(ckpt, tmp_path):
    out = tmp_path / "clean.json"
    assert _run("--model", "gpt2-scratch", "--weights", ckpt, "--json", str(out)) == 0  # reference: gpt2-hf
    report = json.loads(out.read_text())
    _check_schema(report)
    assert report["diverged"] is False and report["first"] is None and report["suspects"] == []
    assert [r["site"] for r in report["sites"]] == ["embed"] + ["attn", "mlp", "block"] * 2 + ["final_norm", "logits"]
    assert all(r["max_abs_diff"] <= 1e-5 for r in report["sites"])
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt2-scratch", "--seq-len", "1"], "--seq-len 1"),
    (["--model", "gpt2-nope"], "unknown model"),
    (["--model", "gpt2-scratch", "--reference", "llama-hf"], "--reference llama-hf"),
    (["--model", "gpt2-scratch", "--json", "/no/such/dir/x.json"], "does not exist"),
    (["--model", "gpt2-scratch", "--plot", "/tmp/x.pdf"], "must end in .png"),
    (["--model", "gpt2-scratch", "--seed", "-1"], "--seed -1"),
], ids=["seq-len", "unknown-model", "wrong-reference", "json-dir", "plot-suffix", "seed"])
def test_bad_input_exit_2_one_line_nothing_written(argv, message, capsys, tmp_path):
    assert main(["diagnose", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) <= 2  # one line (rich may wrap once)
    assert not list(tmp_path.iterdir())


def test_reference_required_for_a_users_file(capsys):
    if not (EXAMPLES / "nanogpt_gpt2.py").exists():
        pytest.skip("examples/nanogpt_gpt2.py not present")
    assert main(["diagnose", "--model", "examples/nanogpt_gpt2.py:build"]) == 2
    assert "--reference" in capsys.readouterr().err


@pytest.mark.parametrize("example, site, cause", [
    ("nanogpt_gpt2.py", "attn", "causal mask"),
    ("raschka_gpt2.py", "attn", "eps"),
], ids=["nanogpt-causal-mask", "raschka-layernorm-eps"])
def test_examples_planted_bugs_are_localised_and_named(example, site, cause, ckpt, tmp_path):
    if not (EXAMPLES / example).exists():
        pytest.skip(f"examples/{example} not present")
    out = tmp_path / "bug.json"
    code = _run("--model", f"examples/{example}:build_buggy", "--reference", "gpt2-hf", "--weights", ckpt,
                "--json", str(out))
    assert code == 1
    report = json.loads(out.read_text())
    _check_schema(report)
    assert report["diverged"] is True
    assert (report["first"]["site"], report["first"]["block"]) == (site, 0)
    assert cause in report["suspects"][0]


@pytest.mark.parametrize("example", ["nanogpt_gpt2.py", "raschka_gpt2.py"])
def test_examples_correct_build_exit_0(example, ckpt):
    if not (EXAMPLES / example).exists():
        pytest.skip(f"examples/{example} not present")
    assert _run("--model", f"examples/{example}:build", "--reference", "gpt2-hf", "--weights", ckpt) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_discovery_aligns_reproduction_and_reference(family):
    ours, ref, _ = tiny_pair(family)
    a, b = discover(ours), discover(ref)
    assert a.n_layer == b.n_layer == 2
    assert a.sites() == b.sites()
    assert all(a.attn) and all(a.mlp) and all(b.attn) and all(b.mlp)
    assert (a.head is None) == (family == "bert") == (a.final_norm is None)


def test_sequential_blocks_and_own_names_are_found():
    """A user's layout: nn.Sequential blocks, `att` / `ff` children, `tok_emb` / `pos_emb`, `out_head`."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.att, self.norm2 = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
            self.ff = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb, self.pos_emb = torch.nn.Embedding(10, 8), torch.nn.Embedding(4, 8)
            self.trf_blocks = torch.nn.Sequential(Block(), Block(), Block())
            self.final_norm = torch.nn.LayerNorm(8)
            self.out_head = torch.nn.Linear(8, 10)

    layout = discover(Model())
    assert (layout.blocks, layout.n_layer) == ("trf_blocks", 3)
    assert layout.attn[2] == "trf_blocks.2.att" and layout.mlp[0] == "trf_blocks.0.ff"
    assert layout.embeds == ["tok_emb", "pos_emb"]
    assert (layout.final_norm, layout.head) == ("final_norm", "out_head")


def test_no_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="ModuleList"):
        discover(torch.nn.Linear(2, 2))


def test_same_inputs_same_numbers():
    ours, ref, vocab = tiny_pair("llama")
    from tasks.mutants import MUTANTS

    mutant = next(m for m in MUTANTS if m.name == "llama-gqa-tiled")
    mutant.apply(ours)
    first, second = (diagnose(ours, ref, "llama", vocab, 12, seed=3).to_json() for _ in range(2))
    assert first == second and first["diverged"]
    assert (first["first"]["site"], first["first"]["block"]) == ("attn", 0)


def test_gradient_only_divergence_is_reported():
    """Forward identical, backward not (a detached branch): diverged, at the first site whose gradient differs."""
    ours, ref, vocab = tiny_pair("gpt2")
    mlp = ours.transformer.h[1].mlp
    original = mlp.forward
    mlp.forward = lambda x: original(x.detach()) + 0 * x  # same values, no gradient into the branch input
    result = diagnose(ours, ref, "gpt2", vocab, 12, 0)
    assert result.diverged and all(not s.diverged for s in result.sites)
    assert result.first.grad_diverged and result.suspects[0].key == "backward"


def test_reference_against_itself_is_exactly_equal():
    """Diagnosing the reference against itself: every difference is exactly 0."""
    _, model, _ = tiny_pair("gpt2")
    result = diagnose(model, model, "gpt2", model.config.vocab_size, 12, 0)
    assert not result.diverged and all(s.max_abs_diff == 0 for s in result.sites)
