"""A whole model pair in under 60 lines: our Llama reproduction held to transformers' Mistral.

Mistral 7B (Jiang et al. 2023, arXiv:2310.06825) is Llama's architecture (RMSNorm, RoPE,
grouped-query attention, SwiGLU) plus sliding-window attention. With `sliding_window=None` the two
compute the same function, so reproductions/llama.py, loaded through its contract
(`Llama.from_hf(hf_config, state_dict)`, `to_hf_state_dict()`), must match `MistralForCausalLM` to
fp32 tolerance on identical weights:

    HARNESS_PLUGINS=examples.plugin_pair harness run --model mistral-scratch,mistral-hf --tasks parity
"""

import transformers

from harness.api import ArchSpec
from harness.api.tokenizer import TextTokenizer, gpt2_tokenizer
from harness.models.causal import CausalArch, register_causal_pair
from reproductions import llama


def random_config(size: str, tokenizer: TextTokenizer) -> transformers.MistralConfig:
    """A named size of the reproduction, as a Mistral config without sliding windows."""
    ours = llama.LlamaConfig.from_name(size, vocab_size=tokenizer.vocab_size)
    cfg = transformers.MistralConfig(**ours.to_hf_kwargs(), sliding_window=None)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = tokenizer.eot_id
    return cfg


ARCH = CausalArch(
    spec=ArchSpec(
        name="mistral",
        hf_model_class=transformers.MistralForCausalLM,
        random_config=random_config,
        sizes=lambda: list(llama.name_to_config),
        tokenizer=gpt2_tokenizer,
        default_weights="random:tiny",
    ),
    repro=llama,
    model=llama.Llama,
    paper="Llama reproduction as Mistral (Jiang et al. 2023)",
    reference_class="MistralForCausalLM",
)
register_causal_pair(ARCH)  # registers mistral-scratch and mistral-hf
