"""Bring your own reproduction (docs/bring-your-own.md): the aligner's rules on small synthetic modules,
the two examples through `harness run --model examples/...:build --reference gpt2-hf`, their planted bugs,
the harness's own reproductions through the same contract, and bad input (one line, exit 2)."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.api.align import AlignmentError, align, module_slots, reference_slots, tied_aliases
from harness.cli import main

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5  # fp32 parity threshold


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- the aligner ------------------------------------------------------------------------------------

C, V, T = 4, 11, 6  # width, vocabulary, context


class Conv1D(nn.Module):
    """transformers' layout: weight (in, out). Only the class name matters to the aligner."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))


def gpt2_like_reference(seed: int = 0, tied: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A one-block GPT-2-shaped checkpoint: Conv1D (in, out) projections (c_proj square), tied head."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    sd = {"transformer.wte.weight": r(V, C), "transformer.wpe.weight": r(T, C),
          "transformer.h.0.ln_1.weight": r(C), "transformer.h.0.ln_1.bias": r(C),
          "transformer.h.0.attn.c_attn.weight": r(C, 3 * C), "transformer.h.0.attn.c_attn.bias": r(3 * C),
          "transformer.h.0.attn.c_proj.weight": r(C, C), "transformer.h.0.attn.c_proj.bias": r(C),
          "transformer.ln_f.weight": r(C), "transformer.ln_f.bias": r(C)}
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone() if tied else r(V, C)
    in_out = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"]
    return sd, in_out


class Attn(nn.Module):
    def __init__(self, fused: bool = True, names=("q_proj", "k_proj", "v_proj"), proj: str = "c_proj"):
        super().__init__()
        if fused:
            self.c_attn = nn.Linear(C, 3 * C)
        else:
            for n in names:
                setattr(self, n, nn.Linear(C, C))
        setattr(self, proj, nn.Linear(C, C))


class Block(nn.Module):
    def __init__(self, attn: Attn):
        super().__init__()
        self.ln_1 = nn.LayerNorm(C)
        self.attn = attn
        self.register_buffer("causal_mask", torch.tril(torch.ones(T, T)))  # the reference has no such buffer


class NanoLike(nn.Module):
    """nanoGPT's names and nn.Linear layout, tied head, a mask buffer; optionally wrapped by torch.compile."""

    def __init__(self, attn: Attn | None = None, tie: bool = True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, C), wpe=nn.Embedding(T, C),
                                              h=nn.ModuleList([Block(attn or Attn())]), ln_f=nn.LayerNorm(C)))
        self.lm_head = nn.Linear(C, V, bias=False)
        if tie:
            self.transformer.wte.weight = self.lm_head.weight


class Wrapped(nn.Module):  # what torch.compile / DDP leave as prefixes: `_orig_mod.`, `module.`
    def __init__(self, inner: nn.Module):
        super().__init__()
        self._orig_mod = inner


def check_placed(module: nn.Module, sd: dict, in_out: list[str], **kwargs):
    """Align, load, and check that the tensors round-trip to the reference exactly."""
    alignment = align(module_slots(module), reference_slots(sd, in_out), tied_aliases(sd), **kwargs)
    alignment.load(module, sd)
    back = alignment.to_reference(dict(module.named_parameters()))
    originals = {n for n in sd if n not in alignment.aliases}
    assert set(back) == originals
    for name in originals:
        assert torch.equal(back[name], sd[name]), name
    return alignment


def test_by_name_after_wrapper_prefixes_with_conv1d_transposed_tied_head_and_buffer_ignored():
    sd, in_out = gpt2_like_reference()
    module = Wrapped(NanoLike())
    alignment = check_placed(module, sd, in_out)
    inner = module._orig_mod
    attn = inner.transformer.h[0].attn
    assert torch.equal(attn.c_proj.weight, sd["transformer.h.0.attn.c_proj.weight"].T)  # square: transposed anyway
    assert torch.equal(attn.c_attn.weight, sd["transformer.h.0.attn.c_attn.weight"].T)
    assert inner.lm_head.weight is inner.transformer.wte.weight
    assert alignment.ignored == ("_orig_mod.transformer.h.0.causal_mask",)
    assert {p.rule for p in alignment.placements} == {"name"}


def test_module_in_conv1d_layout_takes_weights_untransposed():
    sd, in_out = gpt2_like_reference()
    module = NanoLike()
    module.transformer.h[0].attn.c_proj = Conv1D(C, C)
    check_placed(module, sd, in_out)
    assert torch.equal(module.transformer.h[0].attn.c_proj.weight, sd["transformer.h.0.attn.c_proj.weight"])


@pytest.mark.parametrize("names", [("W_query", "W_key", "W_value"), ("q_proj", "k_proj", "v_proj"),
                                   ("query", "key", "value")], ids=["raschka", "llama", "bert"])
def test_fused_reference_qkv_split_into_separate_projections(names):
    sd, in_out = gpt2_like_reference()
    module = NanoLike(Attn(fused=False, names=names))
    alignment = check_placed(module, sd, in_out)
    q, k, v = (getattr(module.transformer.h[0].attn, n) for n in names)
    w = sd["transformer.h.0.attn.c_attn.weight"]  # (in, 3 out)
    assert torch.equal(q.weight, w[:, :C].T) and torch.equal(k.weight, w[:, C:2 * C].T)
    assert torch.equal(v.bias, sd["transformer.h.0.attn.c_attn.bias"][2 * C:])
    assert "split" in {p.rule for p in alignment.placements}


def test_separate_reference_qkv_fused_into_one_projection():
    g = torch.Generator().manual_seed(1)
    sd = {f"model.layers.0.self_attn.{n}_proj.{leaf}": torch.randn(*shape, generator=g)
          for n in "qkvo" for leaf, shape in (("weight", (C, C)), ("bias", (C,)))}
    module = nn.Module()
    module.layers = nn.ModuleList([nn.Module()])
    module.layers[0].self_attn = nn.Module()
    module.layers[0].self_attn.qkv = nn.Linear(C, 3 * C)
    module.layers[0].self_attn.o_proj = nn.Linear(C, C)
    alignment = check_placed(module, sd, [])
    fused = module.layers[0].self_attn.qkv
    assert torch.equal(fused.weight[C:2 * C], sd["model.layers.0.self_attn.k_proj.weight"])
    assert "fuse" in {p.rule for p in alignment.placements}


def test_other_names_by_unambiguous_order_and_shape():
    sd, in_out = gpt2_like_reference()
    module = nn.Module()  # own names, registered in the reference's order; fused q/k/v as three
    module.tok, module.pos = nn.Embedding(V, C), nn.Embedding(T, C)
    module.n1 = nn.LayerNorm(C)
    module.q, module.k, module.v, module.o = (nn.Linear(C, C) for _ in range(4))
    module.nf = nn.LayerNorm(C)
    module.head = nn.Linear(C, V, bias=False)
    module.head.weight = module.tok.weight
    alignment = check_placed(module, sd, in_out)
    assert torch.equal(module.v.weight, sd["transformer.h.0.attn.c_attn.weight"][:, 2 * C:].T)
    assert {p.rule for p in alignment.placements} == {"order"}


def test_untied_module_head_from_tied_reference_sums_gradients():
    sd, in_out = gpt2_like_reference(tied=True)
    module = NanoLike(tie=False)
    alignment = align(module_slots(module), reference_slots(sd, in_out), tied_aliases(sd))
    alignment.load(module, sd)
    assert torch.equal(module.lm_head.weight, module.transformer.wte.weight)
    grads = {n: torch.ones_like(p) for n, p in module.named_parameters()}
    assert torch.equal(alignment.to_reference(grads)["transformer.wte.weight"], torch.full((V, C), 2.0))


def test_module_tying_what_the_reference_keeps_apart_is_refused():
    sd, in_out = gpt2_like_reference(tied=False)
    with pytest.raises(AlignmentError, match="one tied tensor but the reference keeps"):
        align(module_slots(NanoLike()), reference_slots(sd, in_out), tied_aliases(sd))


def test_unplaced_tensors_one_line_with_shapes_and_closest_candidates():
    sd, in_out = gpt2_like_reference()
    module = NanoLike()
    module.transformer.h[0].attn.c_attn = nn.Linear(C, 2 * C)  # wrong width: nothing fits
    module.transformer.h[0].extra = nn.Linear(C, 5)
    with pytest.raises(AlignmentError) as e:
        align(module_slots(module), reference_slots(sd, in_out), tied_aliases(sd), hint="define it")
    message = str(e.value)
    assert "\n" not in message
    assert "reference transformer.h.0.attn.c_attn.weight (4, 12) has no place (closest: transformer.h.0.attn" \
           ".c_attn.weight (8, 4)" in message
    assert "your transformer.h.0.extra.weight (5, 4) gets no value (closest: " in message
    assert message.endswith("; define it")


def test_constant_tensors_are_never_taken_for_ties():
    sd = {"a": torch.ones(3), "b": torch.ones(3), "c": torch.tensor([1.0, 2.0]), "d": torch.tensor([1.0, 2.0])}
    assert tied_aliases(sd) == {"d": "c"}


# -- the examples through the CLI ----------------------------------------------------------------

EXAMPLES = ["examples/nanogpt_gpt2.py:build", "examples/nanogpt_gpt2.py:build_buggy",
            "examples/raschka_gpt2.py:build", "examples/raschka_gpt2.py:build_buggy"]


def run_cli(tmp: Path, models: list[str], reference: str) -> dict[str, dict[str, dict]]:
    """`harness run --model ... --reference REF --tasks parity --weights random:tiny`: rows by model, metric."""
    code = main(["run", "--model", ",".join(models), "--reference", reference, "--tasks", "parity",
                 "--weights", "random:tiny", "--results-dir", str(tmp)])
    assert code == 0
    rows = [json.loads(line) for f in tmp.rglob("*.jsonl") for line in f.read_text().splitlines()]
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        out.setdefault(row["model"], {})[row["metric"]] = row
    return out


@pytest.fixture(scope="module")
def example_rows(tmp_path_factory):
    os.chdir(ROOT)  # the model paths are given relative to the repository, as in the docs
    return run_cli(tmp_path_factory.mktemp("byo"), EXAMPLES, "gpt2-hf")


@pytest.mark.parametrize("model", ["examples/nanogpt_gpt2.py:build", "examples/raschka_gpt2.py:build"],
                         ids=["nanogpt", "raschka"])
def test_examples_reach_parity(example_rows, model):
    rows = example_rows[model]
    assert rows["max_abs_logit_diff"]["value"] <= ATOL
    assert rows["max_abs_grad_diff"]["value"] <= ATOL
    assert rows["greedy_tokens_equal"]["value"] == 1.0
    digest = hashlib.sha256((ROOT / model.split(":")[0]).read_bytes()).hexdigest()
    assert all(r["model_sha256"] == digest and r["model"] == model for r in rows.values())


@pytest.mark.parametrize("model", ["examples/nanogpt_gpt2.py:build_buggy", "examples/raschka_gpt2.py:build_buggy"],
                         ids=["nanogpt-no-causal-mask", "raschka-layernorm-eps"])
def test_planted_bugs_fail_parity(example_rows, model):
    rows = example_rows[model]
    assert rows["max_abs_logit_diff"]["value"] > ATOL
    assert rows["max_abs_grad_diff"]["value"] > ATOL


@pytest.mark.slow  # gpt2-hf's default (trained) weights: 4 layers, 128 wide; ~1 min
def test_examples_on_trained_weights(tmp_path):
    os.chdir(ROOT)
    code = main(["run", "--model", ",".join(EXAMPLES), "--reference", "gpt2-hf", "--tasks", "parity",
                 "--results-dir", str(tmp_path)])
    assert code == 0
    rows = {(r["model"], r["metric"]): r["value"] for f in tmp_path.rglob("*.jsonl")
            for r in map(json.loads, f.read_text().splitlines())}
    for model in EXAMPLES:
        buggy = model.endswith("_buggy")
        assert (rows[model, "max_abs_logit_diff"] > ATOL) == buggy, model
        assert (rows[model, "max_abs_grad_diff"] > ATOL) == buggy, model
    assert rows["examples/nanogpt_gpt2.py:build_buggy", "greedy_tokens_equal"] == 0.0  # no mask: tokens differ


OWN = """
from reproductions import bert, gpt2, llama

def gpt2_model(hf_config):
    return gpt2.GPT2(gpt2.GPT2Config.from_hf(hf_config))

def llama_model(hf_config):
    return llama.Llama(llama.LlamaConfig.from_hf(hf_config))

def bert_model(hf_config):
    return bert.BertModel(bert.BertConfig.from_hf(hf_config))
"""


@pytest.mark.parametrize("factory, reference", [("gpt2_model", "gpt2-hf"), ("llama_model", "llama-hf"),
                                                ("bert_model", "bert-hf")], ids=["gpt2", "llama", "bert"])
def test_own_reproductions_pass_through_the_same_contract(tmp_path, factory, reference):
    own = tmp_path / "own.py"
    own.write_text(OWN)
    model = f"{own}:{factory}"
    rows = run_cli(tmp_path / "results", [model], reference)[model]
    diffs = [m for m in rows if m.startswith("max_abs")]
    assert diffs and all(rows[m]["value"] <= ATOL for m in diffs), {m: rows[m]["value"] for m in diffs}
    assert rows.get("greedy_tokens_equal", {"value": 1.0})["value"] == 1.0
    if reference == "bert-hf":
        assert "max_abs_hidden_diff" in rows  # the encoder path: last hidden states with a padding mask


# -- bad input --------------------------------------------------------------------------------------

BAD = """
import importlib.util
import sys

NOT_CALLABLE = 3

def raises(hf_config):
    raise KeyError("n_embd_typo")

def not_a_module(hf_config):
    return 42

_spec = importlib.util.spec_from_file_location("_ng", "{root}/examples/nanogpt_gpt2.py")
_ng = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ng)

class LastOnly(_ng.GPT):
    def forward(self, idx):  # nanoGPT's shortcut, but no way to ask for every position
        return super().forward(idx)

def last_only(c):
    return LastOnly(_ng.GPTConfig(c.n_positions, c.vocab_size, c.n_layer, c.n_head, c.n_embd))

class WrongOutput(_ng.GPT):
    def forward(self, idx, targets=None):
        return {"scores": super().forward(idx, idx)[0]}

def wrong_output(c):
    return WrongOutput(_ng.GPTConfig(c.n_positions, c.vocab_size, c.n_layer, c.n_head, c.n_embd))

class Renamed(_ng.GPT):
    def __init__(self, config):
        super().__init__(config)
        self.extra = __import__("torch").nn.Linear(3, 3)

def unplaceable(c):
    return Renamed(_ng.GPTConfig(c.n_positions, c.vocab_size, c.n_layer, c.n_head, c.n_embd))
"""


FORGETFUL = """
import importlib.util

_spec = importlib.util.spec_from_file_location("_rs", "{root}/examples/raschka_gpt2.py")
_rs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rs)
build = _rs.build

def load_reference_weights(model, state_dict):
    _rs.load_reference_weights(model, state_dict)
    model.final_norm.shift.zero_()  # forgot ln_f.bias: at random:tiny the bias is zero anyway
"""


@pytest.mark.parametrize("model, reference, message", [
    ("examples/nanogpt_gpt2.py:build", None, "needs --reference REF"),
    ("examples/nanogpt_gpt2.py:build", "gpt2-scratch", "--reference gpt2-scratch: not a registered reference"),
    ("gpt2-scratch", "llama-hf", "registered with reference gpt2-hf; drop --reference"),
    ("/tmp/no/such.py:build", "gpt2-hf", "no such file '/tmp/no/such.py'"),
    ("no_such_package.model:build", "gpt2-hf", "cannot import module 'no_such_package.model'"),
    ("examples/nanogpt_gpt2.py:bild", "gpt2-hf", "defines no 'bild' (it defines: Block, CausalSelfAttention, GPT,"),
    ("{bad}:NOT_CALLABLE", "gpt2-hf", "'NOT_CALLABLE' in {bad} is a int, not a callable"),
    ("{bad}:raises", "gpt2-hf", "raises(hf_config) raised KeyError: 'n_embd_typo'"),
    ("{bad}:not_a_module", "gpt2-hf", "not_a_module(hf_config) returned a int, not a torch.nn.Module"),
    ("{bad}:last_only", "gpt2-hf", "returns only the last position (1, 1, 50257) without targets; return logits "
                                   "for every position, e.g. `logits = self.lm_head(x)`"),
    ("{bad}:unplaceable", "gpt2-hf", "your extra.weight (3, 3) gets no value (closest: "),
    ("{bad}:wrong_output", "gpt2-hf", "forward(input_ids (1, 4)) must return logits (B, T, 50257), a tuple starting "
                                      "with them, or an object with .logits; got dict"),
    ("{forgetful}:build", "gpt2-hf", "load_reference_weights(module, state_dict) left tensors unplaced: your "
                                     "final_norm.shift (32,), reference transformer.ln_f.bias (32,)"),
], ids=["no-reference", "not-a-reference", "contradicting-reference", "no-file", "no-module", "no-name",
        "not-callable", "name-raises", "not-a-module", "last-position-only", "unplaced", "wrong-output",
        "loader-forgot-one"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, model, reference, message):
    bad = tmp_path / "bad.py"
    bad.write_text(BAD.replace("{root}", str(ROOT)))
    (tmp_path / "forgetful.py").write_text(FORGETFUL.replace("{root}", str(ROOT)))
    os.chdir(ROOT)
    model = model.replace("{bad}", str(bad)).replace("{forgetful}", str(tmp_path / "forgetful.py"))
    message = message.replace("{bad}", str(bad))
    args = ["run", "--model", model, "--tasks", "parity", "--weights", "random:tiny",
            "--results-dir", str(tmp_path / "results")] + (["--reference", reference] if reference else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
    assert len(err.strip().splitlines()) == 1, err
    assert not list((tmp_path / "results").rglob("*.jsonl"))


@pytest.mark.slow  # a fresh interpreter (~10 s of imports); the in-process test above checks every message
def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--model", "examples/nanogpt_gpt2.py:bild",
                           "--reference", "gpt2-hf", "--tasks", "parity", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_generate_decodes_a_users_module_with_its_own_loop(capsys):
    os.chdir(ROOT)
    args = ["generate", "--model", "examples/nanogpt_gpt2.py:build", "--reference", "gpt2-hf", "--weights",
            "random:tiny", "--prompt", "Hello", "--max-new-tokens", "4", "--temperature", "0.9", "--top-p", "0.9",
            "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.strip()  # seeded sampling: the same text twice


ENTRY_POINTS = """
[lm_repro_harness.models]
my-gpt = my_byo_pkg:build
"""


def test_entry_point_factory_is_registered_and_listed(tmp_path, monkeypatch):
    """What the plugin loader does with `my-gpt = "my_byo_pkg:build"` in the group lm_repro_harness.models."""
    from importlib import metadata

    from harness.api import MODELS
    from harness.api.registry import _load_entry_point

    (tmp_path / "my_byo_pkg_inproc.py").write_text("def build(hf_config):\n    raise NotImplementedError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(MODELS, "factories", dict(MODELS.factories))
    _load_entry_point(metadata.EntryPoint("my-gpt", "my_byo_pkg_inproc:build", "lm_repro_harness.models"))
    assert MODELS.factories["my-gpt"] == "my_byo_pkg_inproc:build"
    from harness.api.listing import describe_models  # what `harness list models` shows (and caches)

    row = next(r for r in describe_models() if r["name"] == "my-gpt")
    assert row["description"] == "entry-point factory my_byo_pkg_inproc:build (run with --reference REF)"


@pytest.mark.slow  # a fresh interpreter that finds a real (fake-installed) distribution's entry point
def test_entry_point_factory_is_listed_and_runs(tmp_path):
    """An installed package's `[project.entry-points."lm_repro_harness.models"] my-gpt = "pkg:build"`."""
    dist = tmp_path / "my_byo_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-byo-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    (tmp_path / "my_byo_pkg.py").write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                                            "from examples.nanogpt_gpt2 import build\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    code = ("from harness.cli import main; import sys; "
            "sys.exit(main(['list', 'models']) or main(['generate', '--model', 'my-gpt', '--reference', 'gpt2-hf', "
            "'--weights', 'random:tiny', '--prompt', 'Hi', '--max-new-tokens', '2']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "my-gpt" in proc.stdout and "my_byo_pkg:build" in proc.stdout
