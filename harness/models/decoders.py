"""The other decoder-only pairs: GPT-1, Llama and multi-head latent attention (DeepSeek-V2).

Each reproduction file exposes the same small surface (`<Config>.from_name/from_hf/to_hf`,
`<Model>.from_hf_state_dict`, `to_hf_state_dict`), so one factory registers them all. Their own
tokenizers (GPT-1's BPE, Llama's SentencePiece) are not available offline: random and local weights
use GPT-2's BPE (vocabulary 50257), which is what the parity comparison needs; hub checkpoints bring
their own vocabulary size, and `ppl` then needs that checkpoint's tokenizer.json next to it.
"""

from __future__ import annotations

import transformers

from harness.models.causal import CausalArch, register_causal_pair
from harness.tokenizer import TextTokenizer, gpt2_tokenizer
from harness.weights import ArchSpec, Weights
from reproductions import gpt1, llama, mla


def decoder_arch(name: str, repro, config_cls, model_cls, hf_class, paper: str) -> CausalArch:
    def random_config(size: str, tokenizer: TextTokenizer):
        cfg = config_cls.from_name(size, vocab_size=tokenizer.vocab_size).to_hf()
        cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = tokenizer.eot_id
        return cfg

    def build_scratch(weights: Weights):
        return model_cls.from_hf_state_dict(config_cls.from_hf(weights.hf_config), weights.state_dict)

    def to_reference(tensors):
        return repro.to_hf_state_dict(tensors)

    spec = ArchSpec(
        name=name,
        hf_model_class=hf_class,
        random_config=random_config,
        sizes=lambda: list(repro.name_to_config),
        tokenizer=gpt2_tokenizer,
        default_weights="random:tiny",
        default_size="tiny",
    )
    return CausalArch(spec, build_scratch, to_reference, f"reproductions/{repro.__name__.split('.')[-1]}.py", paper)


ARCHS = {
    "gpt1": (
        decoder_arch(
            "gpt1", gpt1, gpt1.GPT1Config, gpt1.GPT1, transformers.OpenAIGPTLMHeadModel, "GPT-1 (Radford et al. 2018)"
        ),
        gpt1.HF_CLASS_NAME,
    ),
    "llama": (
        decoder_arch(
            "llama", llama, llama.LlamaConfig, llama.Llama, transformers.LlamaForCausalLM, "Llama (Touvron et al. 2023)"
        ),
        llama.HF_CLASS_NAME,
    ),
    "mla": (
        decoder_arch(
            "mla",
            mla,
            mla.MLAConfig,
            mla.MLAModel,
            transformers.DeepseekV2ForCausalLM,
            "multi-head latent attention, DeepSeek-V2 (2024)",
        ),
        mla.HF_CLASS_NAME,
    ),
}
for arch, hf_class_name in ARCHS.values():
    register_causal_pair(arch, hf_class_name)
