"""GPT-2: `gpt2-scratch` (reproductions/gpt2.py) and `gpt2-hf` (transformers.GPT2LMHeadModel)."""

from __future__ import annotations

from pathlib import Path

import transformers

from harness.models.causal import CausalArch, register_causal_pair
from harness.tokenizer import TextTokenizer, gpt2_tokenizer
from harness.weights import ArchSpec, Weights
from reproductions import gpt2

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _random_config(size: str, tokenizer: TextTokenizer) -> transformers.GPT2Config:
    # Named sizes come from the reproduction; the vocabulary always follows the tokenizer.
    cfg = gpt2.GPT2Config.from_name(size, vocab_size=tokenizer.vocab_size).to_hf()
    cfg.bos_token_id = cfg.eos_token_id = tokenizer.eot_id
    return cfg


def _build_scratch(weights: Weights) -> gpt2.GPT2:
    cfg = gpt2.GPT2Config.from_hf(weights.hf_config)
    model = gpt2.GPT2(cfg)
    model.load_state_dict(gpt2.from_hf_state_dict(weights.state_dict), strict=True)
    return model


ARCH = CausalArch(
    spec=ArchSpec(
        name="gpt2",
        hf_model_class=transformers.GPT2LMHeadModel,
        random_config=_random_config,
        sizes=lambda: list(gpt2.name_to_config),
        tokenizer=gpt2_tokenizer,
        default_weights="default",
        aliases={"default": lambda: ASSETS / "gpt2-default"},
        default_size="tiny",
    ),
    build_scratch=_build_scratch,
    to_reference=gpt2.to_hf_state_dict,
    scratch_source="reproductions/gpt2.py",
    paper="GPT-2 (Radford et al. 2019)",
)
register_causal_pair(ARCH, "GPT2LMHeadModel")
