"""The other decoder-only pairs: GPT-1, Llama and multi-head latent attention (DeepSeek-V2).

Each reproduction file exposes the same small contract (`HF_CLASS`, `<Config>.from_name/from_hf/
to_hf_kwargs`, `<Model>.from_hf`, `model.to_hf_state_dict`; see reproductions/common.py), so one
factory registers them all. Their own tokenizers (GPT-1's BPE, Llama's SentencePiece) are not
available offline: random and local weights use GPT-2's BPE (vocabulary 50257), which is what the
parity comparison needs; hub checkpoints bring their own vocabulary size, and `ppl` then needs that
checkpoint's tokenizer.json next to it.
"""

from __future__ import annotations

from types import ModuleType

import torch
import transformers

from harness.api import ArchSpec
from harness.api.tokenizer import TextTokenizer, gpt2_tokenizer
from harness.models.causal import CausalArch, register_causal_pair
from reproductions import gpt1, llama, mla


def decoder_arch(name: str, repro: ModuleType, config_cls: type, model_cls: type[torch.nn.Module],
                 paper: str) -> CausalArch:
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
        default_size="tiny",
    )
    return CausalArch(spec, repro, model_cls, paper)


ARCHS = {
    "gpt1": decoder_arch("gpt1", gpt1, gpt1.GPT1Config, gpt1.GPT1, "GPT-1 (Radford et al. 2018)"),
    "llama": decoder_arch("llama", llama, llama.LlamaConfig, llama.Llama, "Llama (Touvron et al. 2023)"),
    "mla": decoder_arch(
        "mla", mla, mla.MLAConfig, mla.MLAModel, "multi-head latent attention, DeepSeek-V2 (2024)"
    ),
}
for arch in ARCHS.values():
    register_causal_pair(arch)
