"""Adapters for decoder-only language models: one for our reproductions, one for the HF references.

An architecture plugs in with a `CausalArch`: its ArchSpec and the reproduction module, used only
through the contract every reproduction shares (`HF_CLASS`, `<Model>.from_hf(hf_config, state_dict)`,
`module.to_hf_state_dict(tensors)`; see reproductions/common.py). Everything else (scoring,
generation, classification, registration) is shared.

Classification (CLASSIFY) is done the GPT-1 way (Radford et al. 2018, "Improving Language
Understanding by Generative Pre-Training", Section 3.3): the input is
`start A delim B extract` and a linear layer reads the final hidden state of the extract token.
GPT-1 learned three new tokens for start/delim/extract; GPT-2 has no spare tokens, so all three
are the end-of-text token `<|endoftext|>`. Padding goes on the right, so with causal attention
the padding never changes the extract token's state. Like GPT-1 (Section 4.1) the head has
dropout 0.1 before it. Not reproduced: the auxiliary language-modelling loss (lambda = 0.5) and,
for similarity tasks, summing the representations of both orderings of the pair.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from harness.api import MODELS, ArchSpec, Capability, HarnessError, ModelAdapter, ModelInfo, ModelSpec, Weights
from harness.api.heads import MIN_ROWS, VOCAB_MULTIPLE, DerivedCache, aligned_head_cache

LM_CAPABILITIES = frozenset({Capability.SCORE, Capability.LOGITS, Capability.GENERATE, Capability.TRAIN,
                             Capability.CAUSAL_LM})
CLASSIFIER_DROPOUT = 0.1  # GPT-1, Section 4.1: "We add dropout to the classifier with a rate of 0.1"


def seeded_head_(head: nn.Linear, seed: int, std: float = 0.02) -> nn.Linear:
    """Fill a classification head from `seed` alone: N(0, std) weights, zero bias. A scratch model
    and its reference get bit-identical heads, whatever else has used the global RNG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
        if head.bias is not None:
            head.bias.zero_()
    return head


class DecoderClassifier(nn.Module):
    """A causal LM body plus a linear head on the extract token's final hidden state (GPT-1, 3.3)."""

    def __init__(self, body: nn.Module, final_hidden: Callable, n_embd: int, num_labels: int, seed: int):
        super().__init__()
        self.body = body
        self.final_hidden = final_hidden  # (body, input_ids, attention_mask) -> (B, T, C)
        self.dropout = nn.Dropout(CLASSIFIER_DROPOUT)
        self.head = seeded_head_(nn.Linear(n_embd, num_labels), seed)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.final_hidden(self.body, input_ids, attention_mask)  # (B, T, C)
        extract = attention_mask.sum(dim=1) - 1  # last real token of each right-padded row
        return self.head(self.dropout(hidden[torch.arange(hidden.size(0)), extract]))  # (B, num_labels)


class DecoderClassification:
    """CLASSIFY for decoder adapters: pair encoding with <|endoftext|> and a fresh `DecoderClassifier`."""

    def encode_pairs(self, texts_a: list[str], texts_b: list[str] | None, max_len: int) -> dict[str, Tensor]:
        """`eot A eot B eot` (or `eot A eot`), truncated longest-first to max_len tokens and
        right-padded: input_ids and attention_mask, each (B, T)."""
        eot = self.tokenizer.eot_id
        a_ids = self.tokenizer.encode_batch(list(texts_a))
        b_ids = self.tokenizer.encode_batch(list(texts_b)) if texts_b is not None else [None] * len(a_ids)
        rows = [_join_pair(a, b, eot, max_len) for a, b in zip(a_ids, b_ids)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def classifier(self, num_labels: int, seed: int) -> nn.Module:
        """A fresh copy of the LM with a seeded head: `module(**encode_pairs(...))` -> (B, num_labels)."""
        cfg = self.weights.hf_config
        n_embd = getattr(cfg, "n_embd", None) or cfg.hidden_size
        body = copy.deepcopy(self.module).train()
        return DecoderClassifier(body, self._final_hidden, n_embd, num_labels, seed).to(self.device)


class HeadSplit:
    """Inference speed for scoring (the `ppl` task): the final hidden states and the LM head apart, so
    that a scorer can run the head only on the positions it scores, a few rows at a time, and never
    hold the full (B, T, vocab) logits. `head(final_hidden(x))` is `logits(x)`; the ppl task checks
    that on a probe before it relies on it."""

    def output_head(self) -> nn.Linear | None:
        """The LM head as an `nn.Linear` (vocab, C), or None where the logits are computed otherwise."""
        head = getattr(self.module, "lm_head", None)
        return head if isinstance(head, nn.Linear) else None

    def final_hidden(self, input_ids: Tensor) -> Tensor:
        """(B, T) -> (B, T, C): what the LM head reads (causal attention, right padding: no mask needed)."""
        return self._final_hidden(self.module, input_ids.to(self.device), None)


class InputMajorLinear(nn.Module):
    """`nn.Linear` for decoding. A single row of input (batch-1 decode) is a matrix-vector product that
    streams the weight from memory; MKL's sgemm streams an (in, out) copy (transformers' GPT-2 `Conv1D`
    layout) faster when out >= in (SmolLM2's 576 -> 49,152 head: 16.4 against 8.4 GB/s; GPT-2's 768 ->
    3,072: 15.3 against 10.8) and the original (out, in) one when in > out (GPT-2's 3,072 -> 768: 13.2
    against 11.3; SmolLM2's 1,536 -> 576: 11.7 against 8.8), so the copy is kept only where it is the
    faster. Several rows (batched decode) always use the original (out, in) weight, then the faster one
    (the SmolLM2 head at 4 rows: 38 ms against 50 ms; GPT-2's 768 -> 3,072 at 8 rows: 2.3 ms against
    3.9 ms; docs/throughput.md). Same arithmetic; the original weight is shared with the module."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_oi = linear.weight.detach()  # (out, in), shared with the module
        self.in_features, self.out_features = linear.in_features, linear.out_features
        input_major = self.out_features >= self.in_features
        self.weight_t = self.weight_oi.t().contiguous() if input_major else None  # (in, out)
        self.bias = None if linear.bias is None else linear.bias.detach()

    @property
    def weight(self) -> Tensor:  # (out, in), for code that reads the dtype or device
        return self.weight_oi

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.size(0) > 1 or self.weight_t is None:
            y = torch.nn.functional.linear(flat, self.weight_oi, self.bias)
        else:
            y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)


def input_major_copy(module: nn.Module, compiled: bool = False) -> nn.Module:
    """A copy of `module` for decoding that shares every parameter but holds each `nn.Linear` as an
    `InputMajorLinear` (an extra copy of the projections with out >= in; tied embeddings stay shared);
    `compiled`: its decode step torch.compiled (`compile_decode`)."""
    fast = copy.deepcopy(module, memo={id(t): t for t in [*module.parameters(), *module.buffers()]})
    for parent in list(fast.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, InputMajorLinear(child))
    return compile_decode(fast.eval()) if compiled else fast.eval()


def decode_copy_cache(compiled: bool = False) -> DerivedCache[nn.Module, nn.Module]:
    """`input_major_copy` of the last module asked for, rebuilt after in-place updates and optimiser steps."""
    return DerivedCache(partial(input_major_copy, compiled=compiled), lambda module: module.parameters())


def compile_decode(module: nn.Module) -> nn.Module:
    """torch.compile what a reproduction's `generate` runs per token, with dynamic shapes (the KV cache
    grows by one position a step; one graph for the prompt, one for the steps): the module's call
    (Llama's and GPT-1's `generate` call `self(...)`) and, where it has one, `hidden_states` (GPT-2's
    calls it and then its head). The small ops between the matrix-vector products (norms, views, cache
    writes, attention on one query) fuse; the products stay MKL's. GPT-2 124M, batch 1, 1 thread, 6
    interleaved samples: 47.5 ms a token against 51.6 eager (median; best 39.4 against 47.8), after
    ~90 s of compiling (docs/throughput.md)."""
    module.compile(dynamic=True)
    if hasattr(module, "hidden_states"):
        module.hidden_states = torch.compile(module.hidden_states, dynamic=True)
    return module


class AllowedTokensHead(nn.Module):
    """An LM head that scores only the `allowed` token ids, for constrained sampling: logits over ids
    0 .. max(allowed), -inf on every id not allowed, so sampling from them (at any temperature) picks an
    allowed token, with probabilities renormalised over them. Logits beyond max(allowed) are left out
    rather than set to -inf: no sampler can pick them either way, and a prefill that scores every
    position (the scratch models do) never builds (B, T, vocab). Reads the wrapped head's weight rows."""

    def __init__(self, head: nn.Linear, allowed: list[int]) -> None:
        super().__init__()
        index = torch.tensor(allowed, dtype=torch.long, device=head.weight.device)
        self.index, self.width = index, max(allowed) + 1
        self.rows = head.weight.detach()[index]  # (len(allowed), C): plain tensors, not parameters
        self.bias = None if head.bias is None else head.bias.detach()[index]

    @property
    def weight(self) -> Tensor:  # the allowed rows (allowed, C), for code that reads the dtype or device
        return self.rows

    def forward(self, x: Tensor) -> Tensor:
        scores = torch.nn.functional.linear(x, self.rows.to(x.dtype), None if self.bias is None else self.bias)
        out = scores.new_full((*x.shape[:-1], self.width), float("-inf"))
        return out.index_copy_(-1, self.index, scores)


@contextmanager
def allowed_tokens_only(module: nn.Module, allowed: list[int] | None) -> Iterator[None]:
    """Inside, `module.lm_head` is an `AllowedTokensHead` over `allowed` (nothing changes for None)."""
    head = module.lm_head
    if allowed is None:
        yield
        return
    if not isinstance(head, nn.Linear):
        raise HarnessError(f"constrained sampling needs an nn.Linear lm_head; this module has {type(head).__name__}")
    module.lm_head = AllowedTokensHead(head, allowed)
    try:
        yield
    finally:
        module.lm_head = head


def _join_pair(a: list[int], b: list[int] | None, eot: int, max_len: int) -> list[int]:
    if b is None:
        return [eot, *a[: max(max_len - 2, 0)], eot]
    a, b = list(a), list(b)
    while len(a) + len(b) > max_len - 3 and (a or b):  # longest first, as BERT's tokenizer does
        (a if len(a) >= len(b) else b).pop()
    return [eot, *a, eot, *b, eot]


@contextmanager
def _lm_head_as_identity(module: nn.Module) -> Iterator[None]:
    """Inside, `module(idx)` returns the final hidden states: the input the LM head would read."""
    head = module.lm_head
    module.lm_head = nn.Identity()
    try:
        yield
    finally:
        module.lm_head = head


def _scratch_final_hidden(body: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    # Causal attention and right padding: the mask cannot change any real token's state.
    with _lm_head_as_identity(body):
        return body(input_ids)


def _hf_final_hidden(body: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    return body.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@dataclass(frozen=True)
class CausalArch:
    spec: ArchSpec
    repro: ModuleType  # e.g. reproductions.gpt2: HF_CLASS names the reference class
    model: type[nn.Module]  # its model class, e.g. gpt2.GPT2: from_hf(...) and to_hf_state_dict(...)
    paper: str
    reference_class: str | None = None  # the transformers class held up to it; default: repro.HF_CLASS

    @property
    def hf_class_name(self) -> str:
        return self.reference_class or self.repro.HF_CLASS

    @property
    def scratch_source(self) -> str:  # e.g. "reproductions/gpt2.py", for `harness list models`
        return f"reproductions/{self.repro.__name__.rsplit('.', 1)[-1]}.py"


class ScratchCausalLM(HeadSplit, DecoderClassification, ModelAdapter):
    capabilities = LM_CAPABILITIES | {Capability.CLASSIFY}  # CLASSIFY needs an `lm_head` (see __init__)
    _final_hidden = staticmethod(_scratch_final_hidden)

    def __init__(self, info, module, tokenizer, weights, device) -> None:
        super().__init__(info, module, tokenizer, weights, device)
        if not isinstance(getattr(module, "lm_head", None), nn.Module):  # e.g. GPT-1 multiplies by W_e^T
            self.capabilities = self.capabilities - {Capability.CLASSIFY}
        self._aligned_heads = aligned_head_cache()
        self._decode_copies = decode_copy_cache()

    def compile(self) -> None:
        """The module in place (prefill, training, parity) and the decode copy's step (`compile_decode`)."""
        super().compile()
        self._decode_copies = decode_copy_cache(compiled=True)

    @property
    def max_length(self) -> int:
        return self.module.config.block_size

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # Causal attention: right padding never influences earlier positions, so no mask is needed.
        return self.module(input_ids.to(self.device))

    def forward(self, module: nn.Module, input_ids: Tensor) -> Tensor:
        """Logits on every position. Without gradients (prefill), for at least `MIN_ROWS` positions and
        a vocabulary that is not a multiple of 64 (GPT-2's 50,257), the LM head runs as an aligned,
        padded copy (`harness.api.heads`, kept until the weights change): the same logits, returned as
        a (B, T, vocab) view of the padded ones."""
        head = getattr(module, "lm_head", None)
        if (torch.is_grad_enabled() or not isinstance(head, nn.Linear) or head.out_features % VOCAB_MULTIPLE == 0
                or input_ids.numel() < MIN_ROWS):
            return module(input_ids)
        hidden = self._final_hidden(module, input_ids, None)
        return self._aligned_heads.get(head)(hidden)[..., : head.out_features]

    def generate_batch(self, idx: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy decode on an inference-time copy whose projections are stored input-major (see
        `input_major_copy`); the module itself, shared with training and parity, is untouched."""
        out = self._decode_copies.get(self.module).generate(idx, max_new_tokens, temperature=0.0)
        return _exact_length(self, idx, out, max_new_tokens)

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=0):
        generator = torch.Generator(device=self.device).manual_seed(seed)
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        out = self.module.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator)
        return out[0, len(prompt_ids):].tolist()

    @torch.inference_mode()
    def sample_batch(self, idx: Tensor, max_new_tokens: int, temperature: float, seed: int,
                     allowed: list[int] | None = None, module: nn.Module | None = None) -> Tensor:
        module = self.module if module is None else module
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with allowed_tokens_only(module, allowed):
            out = module.generate(idx.to(self.device), max_new_tokens, temperature=temperature, generator=generator)
        return _exact_length(self, idx, out, max_new_tokens)


class HFCausalLM(HeadSplit, DecoderClassification, ModelAdapter):
    capabilities = LM_CAPABILITIES | {Capability.CLASSIFY}
    _final_hidden = staticmethod(_hf_final_hidden)

    @property
    def max_length(self) -> int:
        cfg = self.module.config
        return getattr(cfg, "n_positions", None) or cfg.max_position_embeddings

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.module(input_ids=input_ids.to(self.device), attention_mask=mask).logits

    def forward(self, module: nn.Module, input_ids: Tensor) -> Tensor:
        return module(input_ids=input_ids, use_cache=False).logits

    def generate_batch(self, idx: Tensor, max_new_tokens: int) -> Tensor:
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=self.tokenizer.pad_id, use_cache=True)
        with _eos_disabled(self.module):
            out = self.module.generate(idx, generation_config=config, attention_mask=torch.ones_like(idx))
        return _exact_length(self, idx, out, max_new_tokens)

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=0):
        # eos_token_id=None: decode exactly max_new_tokens tokens, as the scratch models do.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=temperature > 0, eos_token_id=None,
            pad_token_id=self.tokenizer.pad_id, **_sampling_kwargs(temperature, top_k, top_p),
        )
        torch.manual_seed(seed)
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        with torch.no_grad(), _eos_disabled(self.module):
            out = self.module.generate(idx, generation_config=config, attention_mask=torch.ones_like(idx))
        return out[0, len(prompt_ids):].tolist()

    @torch.inference_mode()
    def sample_batch(self, idx: Tensor, max_new_tokens: int, temperature: float, seed: int,
                     allowed: list[int] | None = None, module: nn.Module | None = None) -> Tensor:
        module = self.module if module is None else module
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, eos_token_id=None,
                                  pad_token_id=self.tokenizer.pad_id, use_cache=True,
                                  **_sampling_kwargs(temperature, None, None))
        torch.manual_seed(seed)  # transformers samples from the global generator
        idx = idx.to(self.device)
        with _eos_disabled(module), allowed_tokens_only(module, allowed):
            out = module.generate(idx, generation_config=config, attention_mask=torch.ones_like(idx))
        return _exact_length(self, idx, out, max_new_tokens)


@contextmanager
def _eos_disabled(module: nn.Module) -> Iterator[None]:
    """transformers fills an `eos_token_id=None` from `module.generation_config`: clear it there too."""
    config = module.generation_config
    eos, config.eos_token_id = config.eos_token_id, None
    try:
        yield
    finally:
        config.eos_token_id = eos


def _exact_length(model: ModelAdapter, idx: Tensor, out: Tensor, new_tokens: int) -> Tensor:
    if out.shape[1] != idx.shape[1] + new_tokens:
        raise HarnessError(f"{model.name} generated {out.shape[1] - idx.shape[1]} tokens, not {new_tokens}")
    return out


def _sampling_kwargs(temperature: float, top_k: int | None, top_p: float | None) -> dict:
    if temperature <= 0:
        return {}
    return {"temperature": temperature, "top_k": top_k or 0, "top_p": top_p if top_p is not None else 1.0}


class _Scratch(ScratchCausalLM):
    def __init__(self, info: ModelInfo, arch: CausalArch, weights: Weights, device: str) -> None:
        module = arch.model.from_hf(weights.hf_config, weights.state_dict)
        super().__init__(info, module, weights.tokenizer, weights, device)

    def reference_layout(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.module.to_hf_state_dict(tensors)


def _build_hf(arch: CausalArch, info: ModelInfo, weights: Weights, device: str) -> HFCausalLM:
    module = arch.spec.hf_model_class(weights.hf_config)
    module.load_state_dict(weights.state_dict, strict=True)
    return HFCausalLM(info, module, weights.tokenizer, weights, device)


def register_causal_pair(arch: CausalArch) -> None:
    """Register `<arch>-scratch` and `<arch>-hf` with the model registry."""
    name = arch.spec.name
    scratch = ModelInfo(f"{name}-scratch", name, "scratch", reference=f"{name}-hf")
    hf = ModelInfo(f"{name}-hf", name, "hf", reference=None)
    MODELS.add(scratch.name, f"{arch.paper}, from scratch ({arch.scratch_source})",
               ModelSpec(scratch, arch.spec, lambda w, d: _Scratch(scratch, arch, w, d)))
    MODELS.add(hf.name, f"reference: transformers.{arch.hf_class_name}",
               ModelSpec(hf, arch.spec, lambda w, d: _build_hf(arch, hf, w, d)))
