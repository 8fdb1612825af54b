"""Adapters for decoder-only language models: one for our reproductions, one for the HF references.

An architecture plugs in with a `CausalArch`: how to build the scratch module
from reference weights and how to map its tensors back to the reference
layout. Everything else (scoring, generation, registration) is shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from harness.adapter import Capability, ModelAdapter, ModelInfo, ModelSpec
from harness.registry import MODELS
from harness.weights import ArchSpec, Weights

LM_CAPABILITIES = frozenset({Capability.SCORE, Capability.LOGITS, Capability.GENERATE, Capability.TRAIN})


@dataclass(frozen=True)
class CausalArch:
    spec: ArchSpec
    build_scratch: Callable[[Weights], torch.nn.Module]  # reference-layout weights -> our module
    to_reference: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # our names -> reference
    scratch_source: str  # e.g. "reproductions/gpt2.py", for `harness list models`
    paper: str


class ScratchCausalLM(ModelAdapter):
    capabilities = LM_CAPABILITIES

    @property
    def max_length(self) -> int:
        return self.module.config.block_size

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # Causal attention: right padding never influences earlier positions, so no mask is needed.
        return self.module(input_ids.to(self.device))

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=0):
        generator = torch.Generator(device=self.device).manual_seed(seed)
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        out = self.module.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator)
        return out[0, len(prompt_ids):].tolist()


class HFCausalLM(ModelAdapter):
    capabilities = LM_CAPABILITIES

    @property
    def max_length(self) -> int:
        cfg = self.module.config
        return getattr(cfg, "n_positions", None) or cfg.max_position_embeddings

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.module(input_ids=input_ids.to(self.device), attention_mask=mask).logits

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=0):
        # eos_token_id=None: decode exactly max_new_tokens tokens, as the scratch models do.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=temperature > 0, eos_token_id=None,
            pad_token_id=self.tokenizer.pad_id, **_sampling_kwargs(temperature, top_k, top_p),
        )
        torch.manual_seed(seed)
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        with torch.no_grad():
            out = self.module.generate(idx, generation_config=config, attention_mask=torch.ones_like(idx))
        return out[0, len(prompt_ids):].tolist()


def _sampling_kwargs(temperature: float, top_k: int | None, top_p: float | None) -> dict:
    if temperature <= 0:
        return {}
    return {"temperature": temperature, "top_k": top_k or 0, "top_p": top_p if top_p is not None else 1.0}


class _Scratch(ScratchCausalLM):
    def __init__(self, info: ModelInfo, arch: CausalArch, weights: Weights, device: str) -> None:
        super().__init__(info, arch.build_scratch(weights), weights.tokenizer, weights, device)
        self._to_reference = arch.to_reference

    def reference_layout(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._to_reference(tensors)


def _build_hf(arch: CausalArch, info: ModelInfo, weights: Weights, device: str) -> HFCausalLM:
    module = arch.spec.hf_model_class(weights.hf_config)
    module.load_state_dict(weights.state_dict, strict=True)
    return HFCausalLM(info, module, weights.tokenizer, weights, device)


def register_causal_pair(arch: CausalArch, hf_class_name: str) -> None:
    """Register `<arch>-scratch` and `<arch>-hf` with the model registry."""
    name = arch.spec.name
    scratch = ModelInfo(f"{name}-scratch", name, "scratch", reference=f"{name}-hf")
    hf = ModelInfo(f"{name}-hf", name, "hf", reference=None)
    MODELS.add(scratch.name, f"{arch.paper}, from scratch ({arch.scratch_source})",
               ModelSpec(scratch, arch.spec, lambda w, d: _Scratch(scratch, arch, w, d)))
    MODELS.add(hf.name, f"reference: transformers.{hf_class_name}",
               ModelSpec(hf, arch.spec, lambda w, d: _build_hf(arch, hf, w, d)))
