"""The contract every neural reproduction keeps (reproductions/common.py), and that adapters rely on.

    HF_CLASS                              the transformers class of the reference, by name
    <Config>.from_name / from_hf          a named size / a transformers config (duck-typed)
    <Config>.to_hf_kwargs()               keyword arguments of that class's config_class
    <Model>.from_hf(hf_config, sd)        strict load of a reference-layout state dict
    model.to_hf_state_dict(tensors=None)  back to the reference's names and layouts

One row per reproduction; every check is exact (torch.equal), on `tiny` random reference weights.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

from reproductions import bert, gpt1, gpt2, llama, mla, transformer
from reproductions.common import CheckpointMismatchError

transformers = pytest.importorskip("transformers")


@dataclass(frozen=True)
class Repro:
    module: ModuleType
    config: type
    model: type[torch.nn.Module]

    @property
    def hf_class(self) -> type[torch.nn.Module]:
        return getattr(transformers, self.module.HF_CLASS)

    def hf_config(self, cfg):
        return self.hf_class.config_class(**cfg.to_hf_kwargs())


REPROS = [
    pytest.param(Repro(gpt2, gpt2.GPT2Config, gpt2.GPT2), id="gpt2"),
    pytest.param(Repro(gpt1, gpt1.GPT1Config, gpt1.GPT1), id="gpt1"),
    pytest.param(Repro(llama, llama.LlamaConfig, llama.Llama), id="llama"),
    pytest.param(Repro(mla, mla.MLAConfig, mla.MLAModel), id="mla"),
    pytest.param(Repro(bert, bert.BertConfig, bert.BertModel), id="bert"),
    pytest.param(Repro(transformer, transformer.TransformerConfig, transformer.Transformer), id="transformer"),
]


def tiny_reference(repro: Repro, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return repro.hf_class(repro.hf_config(repro.config.from_name("tiny"))).eval()


@pytest.mark.parametrize("repro", REPROS)
def test_hf_class_names_a_transformers_model_class(repro: Repro) -> None:
    assert isinstance(repro.module.HF_CLASS, str)
    cls = repro.hf_class
    assert isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    assert issubclass(cls.config_class, transformers.PretrainedConfig)


@pytest.mark.parametrize("repro", REPROS)
def test_every_named_size_builds_and_round_trips_through_the_hf_config(repro: Repro) -> None:
    assert "tiny" in repro.module.name_to_config
    for name in repro.module.name_to_config:
        cfg = repro.config.from_name(name)
        assert isinstance(cfg, repro.config)
        kwargs = cfg.to_hf_kwargs()
        assert isinstance(kwargs, dict)
        assert repro.config.from_hf(repro.hf_class.config_class(**kwargs)) == cfg, name


@pytest.mark.parametrize("repro", REPROS)
def test_from_hf_then_to_hf_state_dict_reproduces_the_reference_exactly(repro: Repro) -> None:
    hf = tiny_reference(repro)
    reference = hf.state_dict()
    ours = repro.model.from_hf(hf.config, reference)
    assert isinstance(ours, repro.model)
    back = ours.to_hf_state_dict()
    assert back.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("repro", REPROS)
def test_to_hf_state_dict_maps_a_dict_keyed_by_parameter_names(repro: Repro) -> None:
    """What adapters do with gradients: a dict keyed like named_parameters() (here the weights
    themselves, so the expected values are known) comes back in the reference's names and layouts."""
    hf = tiny_reference(repro)
    reference = hf.state_dict()
    ours = repro.model.from_hf(hf.config, reference)
    mapped = ours.to_hf_state_dict({k: p.detach() for k, p in ours.named_parameters()})
    assert mapped.keys() <= reference.keys()
    assert {k for k, p in hf.named_parameters() if p.requires_grad} <= mapped.keys()
    for key, tensor in mapped.items():
        assert torch.equal(tensor, reference[key]), key


@pytest.mark.parametrize("repro", REPROS)
def test_a_wrong_shaped_tensor_is_a_value_error_naming_it(repro: Repro) -> None:
    hf = tiny_reference(repro)
    sd = dict(hf.state_dict())
    key = sorted(k for k, p in hf.named_parameters() if p.dim() == 2 and p.requires_grad)[-1]
    rows, cols = sd[key].shape
    sd[key] = torch.zeros(rows + 1, cols)
    with pytest.raises(ValueError, match=re.escape(key)) as err:
        repro.model.from_hf(hf.config, sd)
    assert isinstance(err.value, CheckpointMismatchError)


@pytest.mark.parametrize("repro", REPROS)
def test_the_old_conversion_names_are_gone(repro: Repro) -> None:
    for name in ("HF_CLASS_NAME", "from_hf_state_dict", "to_hf_state_dict", "load_hf_weights", "from_pretrained"):
        assert not hasattr(repro.module, name), name
    assert not hasattr(repro.config, "to_hf")
    assert not hasattr(repro.model, "from_hf_state_dict")


def _imports(source: str) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement, at any depth (function bodies too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            found.append((node.module or "", [alias.name for alias in node.names]))
    return found


def _allowed(module: str, names: list[str]) -> bool:
    top = module.split(".")[0]
    if top == "torch" or top == "__future__" or top in sys.stdlib_module_names:
        return True
    return module == "reproductions.common" or (module == "reproductions" and names == ["common"])


@pytest.mark.parametrize("repro", REPROS)
def test_imports_only_torch_the_standard_library_and_common(repro: Repro) -> None:
    imports = _imports(inspect.getsource(repro.module))
    assert imports, "no imports found: the parser missed them"
    bad = [module for module, names in imports if not _allowed(module, names)]
    assert bad == [], f"{repro.module.__name__} imports {bad}"
