"""Llama: a pre-norm decoder with RMSNorm, rotary positions, SwiGLU and no biases.

Touvron et al. (2023a), "LLaMA: Open and Efficient Foundation Language Models";
Touvron et al. (2023b), "Llama 2: Open Foundation and Fine-Tuned Chat Models";
Grattafiori et al. (2024), "The Llama 3 Herd of Models".

What Llama changed relative to GPT-2 (Sec. 2.2 of the LLaMA paper), visible by diffing
this file against `gpt2.py`:
  * RMSNorm (Zhang & Sennrich 2019) instead of LayerNorm: no mean subtraction, no bias.
  * rotary position embeddings (RoPE, Su et al. 2021) applied to queries and keys in every
    layer, instead of a learned position table added once to the input.
  * SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)) with a hidden size of
    about 8/3 * n_embd (rounded), instead of GELU(fc(x)) at 4 * n_embd.
  * no biases anywhere, and an output layer `lm_head` not tied to the embedding.
  * Llama 2 (34B/70B) and Llama 3 (all sizes) add grouped-query attention (Ainslie et al.
    2023): `n_kv_head` < `n_head` key/value heads, each shared by n_head / n_kv_head queries.
  * Llama 3: 128K-token vocabulary and rope_theta 500,000 instead of 10,000.

RoPE layout. Meta's original code rotates *adjacent* pairs (x[2i], x[2i+1]) as complex
numbers; `transformers.LlamaForCausalLM` (the parity target) rotates the pair (x[i],
x[i + hs/2]) via `rotate_half`, and its conversion script permutes the rows of q_proj and
k_proj so that both give the same outputs. This file uses the HF layout so HF weights load
unchanged. Parameter names follow HF (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, `model.norm`, `lm_head`), so the name map is the identity.

Not reproduced: RoPE scaling variants (Llama 3.1's "llama3" rope_type, linear/dynamic/YaRN),
attention/MLP biases, and head_dim != n_embd / n_head; `from_hf` rejects such configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reproductions.common import CheckpointMismatchError, check_state_dict, sample_next

HF_CLASS = "LlamaForCausalLM"  # the reference: transformers.LlamaForCausalLM


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    block_size: int = 2048  # training context; RoPE itself has no hard limit
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32  # key/value heads; < n_head is grouped-query attention, 1 is multi-query
    n_embd: int = 4096
    intermediate_size: int = 11008  # SwiGLU width; LLaMA: 8/3 * n_embd rounded up to a multiple of 256
    rope_theta: float = 10000.0  # base of the rotary frequencies theta_i = rope_theta^(-2i/hs)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # Llama ties none; small variants (e.g. Llama 3.2 1B) do

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_floats_per_token(self) -> int:
        """Numbers the KV cache stores per token across all layers (keys and values)."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        if name not in name_to_config:
            raise ValueError(f"unknown Llama size {name!r}; choose one of: {', '.join(name_to_config)}")
        return replace(name_to_config[name], **overrides)

    @classmethod
    def from_hf(cls, hf_config: Any) -> LlamaConfig:
        """Read a `transformers.LlamaConfig` (or a config of the same family, e.g. Mistral's: a field it
        lacks means the feature is off), rejecting features this file does not reproduce."""
        rope = hf_config.rope_parameters or {}
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        unsupported = {
            "rope scaling": rope.get("rope_type", "default") != "default",
            "attention_bias": getattr(hf_config, "attention_bias", False),
            "mlp_bias": getattr(hf_config, "mlp_bias", False),
            "head_dim != hidden_size / heads": head_dim != hf_config.hidden_size // hf_config.num_attention_heads,
            "hidden_act != silu": hf_config.hidden_act != "silu",
            "sliding-window attention": getattr(hf_config, "sliding_window", None) is not None,
        }
        if any(unsupported.values()):
            raise ValueError(f"unsupported Llama config: {[k for k, v in unsupported.items() if v]}")
        return cls(
            vocab_size=hf_config.vocab_size,
            block_size=hf_config.max_position_embeddings,
            n_layer=hf_config.num_hidden_layers,
            n_head=hf_config.num_attention_heads,
            n_kv_head=hf_config.num_key_value_heads,
            n_embd=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            norm_eps=hf_config.rms_norm_eps,
            tie_word_embeddings=hf_config.tie_word_embeddings,
        )

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the equivalent `transformers.LlamaConfig`."""
        return dict(
            vocab_size=self.vocab_size,
            max_position_embeddings=self.block_size,
            num_hidden_layers=self.n_layer,
            num_attention_heads=self.n_head,
            num_key_value_heads=self.n_kv_head,
            hidden_size=self.n_embd,
            intermediate_size=self.intermediate_size,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=self.norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
        )


name_to_config: dict[str, LlamaConfig] = {
    # test size, with grouped-query attention (2 query heads per key/value head)
    "tiny": LlamaConfig(
        vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=176
    ),
    # LLaMA paper Table 2; HF `huggyllama/llama-7b`, `huggyllama/llama-13b`
    "llama-7b": LlamaConfig(),
    "llama-13b": LlamaConfig(n_layer=40, n_head=40, n_kv_head=40, n_embd=5120, intermediate_size=13824),
    # Llama 2 paper Table 1 (context 4096); HF `meta-llama/Llama-2-7b-hf`
    "llama2-7b": LlamaConfig(block_size=4096, norm_eps=1e-5),
    # Llama 3 paper Table 3 (8B: 8 KV heads, 128K vocab, theta 500K); HF `meta-llama/Meta-Llama-3-8B`
    "llama3-8b": LlamaConfig(
        vocab_size=128256,
        block_size=8192,
        n_kv_head=8,
        intermediate_size=14336,
        rope_theta=500000.0,
        norm_eps=1e-5,
    ),
}


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` tokens.

    `k`, `v`: (n_layer, B, n_kv_head, max_len, hs), keys stored *after* RoPE. `pos` tokens
    are filled; each forward writes its new tokens at [pos, pos + T) and the model then
    advances `pos`. With GQA the cache is n_head / n_kv_head times smaller than for MHA.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) for `layer`; return all keys/values so far (B, nkv, pos+T, hs)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot grow to {end}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def causal_mask(t: int, start: int, device: torch.device) -> torch.Tensor:
    """(T, start+T) bool: the query at absolute position start+i may see keys 0..start+i."""
    return torch.ones(t, start + t, dtype=torch.bool, device=device).tril(diagonal=start)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, hs) for absolute positions (T,): angle m * theta_i, repeated for both halves."""
    freqs = positions[:, None].float() * inv_freq[None, :]  # (T, hs/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, hs): HF layout pairs dim i with dim i + hs/2
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated_half * sin


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, start+T, hs)
        groups = self.n_head // self.n_kv_head  # query heads per key/value head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, S, hs)
        if start == 0:  # no cache before: plain causal attention, SDPA's fused path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        elif T == 1:  # one new token attends to every cached position: no mask at all
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, start, x.device))  # mask (T, S)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
                layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                norm=RMSNorm(config.n_embd, config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        hs = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float) / hs))  # (hs/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """N(0, 0.02) for every matrix, as HF's `initializer_range`; RMSNorm weights stay 1."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(start, start + T, device=idx.device))  # (T, hs)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        for block in self.model.layers:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.lm_head(self.model.norm(x))  # (B, T, vocab)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens tokens -> (B, T + max_new_tokens); greedy at temperature 0."""
        B, T = idx.shape
        out = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)
        out[:, :T] = idx
        if max_new_tokens == 0:
            return out
        w = self.model.embed_tokens.weight
        cache = KVCache(self.config, B, T + max_new_tokens, device=w.device, dtype=w.dtype)
        logits = self(idx, kv_cache=cache)[:, -1]  # (B, V)
        for i in range(T, T + max_new_tokens):
            out[:, i : i + 1] = sample_next(logits, temperature, top_k, top_p, generator)
            if i + 1 < T + max_new_tokens:
                logits = self(out[:, i : i + 1], kv_cache=cache)[:, -1]
        return out

    # ---- conversion to and from transformers.LlamaForCausalLM: the names already match ----

    @classmethod
    def from_hf(cls, hf_config: Any, state_dict: Mapping[str, torch.Tensor]) -> Llama:
        """A model holding a HF `LlamaForCausalLM` checkpoint; a CheckpointMismatchError names the
        tensors that do not fit `hf_config`."""
        model = cls(LlamaConfig.from_hf(hf_config))
        sd = _drop_buffers(state_dict)
        sd = _with_tied_head(sd, model.config.tie_word_embeddings)
        check_state_dict(_shapes(model), sd, source=f"HF {HF_CLASS} state dict")
        model.load_state_dict(sd)
        return model

    def to_hf_state_dict(
        self, tensors: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """This model's tensors, or `tensors` keyed like them (e.g. gradients, possibly only some),
        keyed as `LlamaForCausalLM` loads them (the same names; a tied lm_head filled in)."""
        sd = _with_tied_head(self.state_dict() if tensors is None else tensors, self.config.tie_word_embeddings)
        check_state_dict(_shapes(self), sd, source="Llama tensors", allow_missing=True)
        return sd


# --- helpers of the conversion ------------------------------------------------------------------


def _shapes(model: Llama) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _with_tied_head(sd: Mapping[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Fill in a tied `lm_head.weight` that a checkpoint or gradient dict left out; reject an untied one."""
    sd = dict(sd)
    embed = sd.get("model.embed_tokens.weight")
    if not tied or embed is None:
        return sd
    head = sd.setdefault("lm_head.weight", embed)
    if head is not embed and head.shape == embed.shape and not torch.equal(head, embed):
        raise CheckpointMismatchError(
            "lm_head.weight differs from model.embed_tokens.weight but the config ties them"
        )
    return sd


def _drop_buffers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `rotary_emb.inv_freq`, a buffer (not a weight) that older HF Llama checkpoints saved."""
    return {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
