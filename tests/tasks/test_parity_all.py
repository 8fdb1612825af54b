"""The `parity` task on every registered scratch model that has a reference, through the harness path
(registry -> load_weights -> adapters -> Parity), on `random:tiny` weights and on a second, unseen config.

The unseen config is a registered cheap size when the reproduction offers one (names starting with
"tiny", e.g. mla's `tiny-q-lora`); otherwise odd shapes (other head counts, depths, widths, shorter
context), mirroring each reproduction's own tests, are added to the reproduction's `name_to_config`
for the duration of the test, so `random:unseen` goes through exactly the same code as a real size.
The character-level ladder (trained by its tasks, nothing to load) and models without LOGITS are skipped.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from harness.api import MODELS, Capability, RunContext, load_plugins
from harness.runner import ModelPool, RunPlan
from tasks.parity import Parity, ParityConfig

ATOL = 1e-5
# Shorter than the task's defaults (2 x 64 tokens, 20 greedy tokens), same code: keeps ~20 runs quick.
CONFIG = ParityConfig(batch_size=2, seq_len=24, new_tokens=8)

# Reproduction-config overrides of "tiny" for archs without a cheap second registered size.
UNSEEN: dict[str, dict] = {
    "gpt2": dict(block_size=48, n_layer=3, n_head=3, n_embd=48),
    "gpt1": dict(block_size=48, n_layer=3, n_head=6, n_embd=48, layer_norm_eps=1e-6),
    "llama": dict(n_layer=3, n_head=6, n_kv_head=1, n_embd=48, intermediate_size=120, rope_theta=500000.0,
                  norm_eps=1e-5, tie_word_embeddings=True),
    "transformer": dict(d_model=24, n_head=3, n_layer=1, d_ff=40, max_len=48),
    "bert": dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=3, intermediate_size=40),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def scratch_models() -> list[str]:
    load_plugins()
    return [e.name for e in MODELS if e.obj.info.impl == "scratch" and e.obj.info.reference]


def skip_reason(name: str) -> str | None:
    arch = MODELS.get(name).arch
    if arch.name.startswith("char"):
        return "character-level ladder: trained from scratch by its tasks, no weights to compare"
    if "tiny" not in arch.sizes():
        return f"{arch.name} has no random:tiny weights"
    return None


def parity_metrics(name: str, weights: str) -> tuple[dict[str, float], bool]:
    """The parity task's metrics, and whether both models of the pair generate."""
    pool = ModelPool(RunPlan(models=[name], tasks=["parity"], weights=weights))
    model = pool.get(name)
    if Capability.LOGITS not in model.capabilities:
        pytest.skip(f"{name} has no LOGITS capability")
    reference = pool.reference(model)
    ctx = RunContext(seed=0, limit=None, device="cpu", reference=pool.reference, track=lambda it, **_: it)
    both_generate = all(Capability.GENERATE in m.capabilities for m in (model, reference))
    return {m.metric: m.value for m in Parity(CONFIG).run(model, ctx)}, both_generate


def assert_at_parity(metrics: dict[str, float], both_generate: bool) -> None:
    assert metrics["max_abs_logit_diff"] <= ATOL
    assert metrics["max_abs_grad_diff"] <= ATOL
    assert metrics.get("max_abs_hidden_diff", 0.0) <= ATOL
    assert ("greedy_tokens_equal" in metrics) == both_generate
    assert metrics.get("greedy_tokens_equal", 1.0) == 1.0


@pytest.mark.parametrize("name", scratch_models(), ids=str)
def test_tiny_weights_are_at_parity(name):
    reason = skip_reason(name)
    if reason:
        pytest.skip(reason)
    assert_at_parity(*parity_metrics(name, "random:tiny"))


def unseen_size(name: str, monkeypatch) -> str:
    """A second cheap config: a registered `tiny-*` size, or UNSEEN's shapes added as size "unseen"."""
    arch = MODELS.get(name).arch
    registered = [s for s in arch.sizes() if s.startswith("tiny") and s != "tiny"]
    if registered:
        return registered[0]
    if arch.name not in UNSEEN:
        pytest.skip(f"no unseen config for {arch.name}: no cheap registered size beyond tiny and none in UNSEEN")
    table = importlib.import_module(f"reproductions.{arch.name}").name_to_config
    tiny = table["tiny"]
    entry = {**tiny, **UNSEEN[arch.name]} if isinstance(tiny, dict) else dataclasses.replace(tiny, **UNSEEN[arch.name])
    monkeypatch.setitem(table, "unseen", entry)
    return "unseen"


@pytest.mark.parametrize("name", scratch_models(), ids=str)
def test_unseen_config_is_at_parity(name, monkeypatch):
    reason = skip_reason(name)
    if reason:
        pytest.skip(reason)
    size = unseen_size(name, monkeypatch)
    assert_at_parity(*parity_metrics(name, f"random:{size}"))
