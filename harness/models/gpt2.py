"""GPT-2: `gpt2-scratch` (reproductions/gpt2.py) and `gpt2-hf` (transformers.GPT2LMHeadModel)."""

from __future__ import annotations

from pathlib import Path

import transformers

from harness.api import ArchSpec
from harness.api.tokenizer import TextTokenizer, gpt2_tokenizer
from harness.models.causal import CausalArch, register_causal_pair
from reproductions import gpt2

ASSETS = Path(__file__).resolve().parent.parent / "assets"
HF_MODEL = getattr(transformers, gpt2.HF_CLASS)  # transformers.GPT2LMHeadModel


def hf_config(cfg: gpt2.GPT2Config) -> transformers.GPT2Config:
    """The `transformers.GPT2Config` equivalent to a reproduction config."""
    return HF_MODEL.config_class(**cfg.to_hf_kwargs())


def _random_config(size: str, tokenizer: TextTokenizer) -> transformers.GPT2Config:
    # Named sizes come from the reproduction; the vocabulary always follows the tokenizer.
    cfg = hf_config(gpt2.GPT2Config.from_name(size, vocab_size=tokenizer.vocab_size))
    cfg.bos_token_id = cfg.eos_token_id = tokenizer.eot_id
    return cfg


ARCH = CausalArch(
    spec=ArchSpec(
        name="gpt2",
        hf_model_class=HF_MODEL,
        random_config=_random_config,
        sizes=lambda: list(gpt2.name_to_config),
        tokenizer=gpt2_tokenizer,
        default_weights="default",
        aliases={"default": lambda: ASSETS / "gpt2-default"},
        default_size="tiny",
    ),
    repro=gpt2,
    model=gpt2.GPT2,
    paper="GPT-2 (Radford et al. 2019)",
)
register_causal_pair(ARCH)
