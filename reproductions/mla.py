"""Multi-head latent attention (MLA) in a Llama-style decoder.

DeepSeek-AI (2024), "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts
Language Model", Sec. 2.1. Everything outside attention is `llama.py` (RMSNorm, SwiGLU,
pre-norm, untied head); diff the two files to see what MLA replaces.

MLA shrinks the KV cache by caching one low-rank latent per token instead of per-head keys
and values (paper eqs. 9-19, names as in the HF checkpoint):

    [c_kv ; k_rope] = kv_a_proj_with_mqa(h)          c_kv: (kv_lora_rank,), k_rope: (dr,)
    c_kv            = kv_a_layernorm(c_kv)            the latent that is cached
    [k_nope ; v]    = kv_b_proj(c_kv), per head       up-projection W^UK, W^UV
    k_rope          = RoPE(k_rope)                    one rotary key shared by all heads (cached)
    q               = q_proj(h)   or   q_b_proj(q_a_layernorm(q_a_proj(h)))   (optional q LoRA)
    [q_nope ; q_rope], q_rope = RoPE(q_rope)
    score           = (q_nope . k_nope + q_rope . k_rope) / sqrt(dn + dr)

RoPE is "decoupled": it cannot act on keys rebuilt from the latent (a position-dependent
rotation between W^UK and the query would stop W^UK being absorbed), so a separate
dr-wide rotary part is carried next to the latent.

KV cache. `LatentCache` stores c_kv and the rotated k_rope: (kv_lora_rank + dr) numbers per
token and layer, against 2 * n_head * head_dim for multi-head attention (DeepSeek-V2: 576 vs
32,768). With a cache, attention runs in the "absorbed" form of Sec. 2.1.2: W^UK is folded
into the query and W^UV into the output, so attention is computed against the latent
directly, which is multi-query attention with one shared (kv_lora_rank + dr)-wide key and a
kv_lora_rank-wide value. Without a cache (training, scoring) keys and values are expanded
per head, as in the paper's equations. `test_mla.py` checks both give the same logits.

Parity target: `transformers.DeepseekV2ForCausalLM` with every layer dense
(`first_k_dense_replace = n_layer`); parameter names follow it, so the name map is the identity.
Its RoPE on q_rope / k_rope rotates *adjacent* pairs (x[2i], x[2i+1]) (complex-number form),
unlike `llama.py`'s HF layout; this file does the same. Its latent RMSNorms use eps 1e-6
whatever `rms_norm_eps` is, and so does this file.

Not reproduced: DeepSeek-V2's mixture-of-experts FFN (DeepSeekMoE) and its YaRN context
extension; `from_hf` rejects configs that use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reproductions.common import CheckpointMismatchError, check_state_dict, sample_next

HF_CLASS = "DeepseekV2ForCausalLM"  # the reference: transformers.DeepseekV2ForCausalLM
LATENT_NORM_EPS = 1e-6  # kv_a_layernorm / q_a_layernorm, fixed in DeepSeek-V2's code


@dataclass(frozen=True)
class MLAConfig:
    vocab_size: int = 102400
    block_size: int = 4096
    n_layer: int = 27
    n_head: int = 16
    n_embd: int = 2048
    intermediate_size: int = 10944  # SwiGLU hidden size of every (dense) layer
    kv_lora_rank: int = 512  # width of the cached latent c_kv
    q_lora_rank: int | None = None  # None: plain q_proj; int: q_a_proj -> q_a_layernorm -> q_b_proj
    qk_nope_head_dim: int = 128  # per-head query/key width without position information
    qk_rope_head_dim: int = 64  # decoupled rotary width (dr), key part shared by all heads
    v_head_dim: int = 128  # per-head value width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6  # RMSNorm epsilon of the block and final norms
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.qk_rope_head_dim % 2 != 0:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for RoPE")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_floats_per_token(self) -> int:
        """Numbers the latent cache stores per token across all layers."""
        return self.n_layer * (self.kv_lora_rank + self.qk_rope_head_dim)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> MLAConfig:
        if name not in name_to_config:
            raise ValueError(f"unknown MLA size {name!r}; choose one of: {', '.join(name_to_config)}")
        return replace(name_to_config[name], **overrides)

    @classmethod
    def from_hf(cls, hf_config: Any) -> MLAConfig:
        """Read a `transformers.DeepseekV2Config` whose layers are all dense."""
        rope = hf_config.rope_parameters or {}
        unsupported = {
            "MoE layers (first_k_dense_replace < num_hidden_layers)": hf_config.first_k_dense_replace
            < hf_config.num_hidden_layers,
            "rope scaling": rope.get("rope_type", "default") != "default",
            "attention_bias": hf_config.attention_bias,
            "mlp_bias": hf_config.mlp_bias,
            "num_key_value_heads != num_attention_heads": hf_config.num_key_value_heads
            != hf_config.num_attention_heads,
            "hidden_act != silu": hf_config.hidden_act != "silu",
        }
        if any(unsupported.values()):
            raise ValueError(f"unsupported DeepSeek-V2 config: {[k for k, v in unsupported.items() if v]}")
        return cls(
            vocab_size=hf_config.vocab_size,
            block_size=hf_config.max_position_embeddings,
            n_layer=hf_config.num_hidden_layers,
            n_head=hf_config.num_attention_heads,
            n_embd=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            kv_lora_rank=hf_config.kv_lora_rank,
            q_lora_rank=hf_config.q_lora_rank,
            qk_nope_head_dim=hf_config.qk_nope_head_dim,
            qk_rope_head_dim=hf_config.qk_rope_head_dim,
            v_head_dim=hf_config.v_head_dim,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            norm_eps=hf_config.rms_norm_eps,
            tie_word_embeddings=hf_config.tie_word_embeddings,
        )

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the equivalent `transformers.DeepseekV2Config`, with every layer a dense MLP."""
        return dict(
            vocab_size=self.vocab_size,
            max_position_embeddings=self.block_size,
            num_hidden_layers=self.n_layer,
            first_k_dense_replace=self.n_layer,  # no MoE layers
            num_attention_heads=self.n_head,
            num_key_value_heads=self.n_head,
            hidden_size=self.n_embd,
            intermediate_size=self.intermediate_size,
            kv_lora_rank=self.kv_lora_rank,
            q_lora_rank=self.q_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=self.norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
        )


name_to_config: dict[str, MLAConfig] = {
    # test sizes; "tiny" has no q LoRA (like DeepSeek-V2-Lite), "tiny-q-lora" has one (like DeepSeek-V2)
    "tiny": MLAConfig(
        vocab_size=1000,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_embd=64,
        intermediate_size=176,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
    ),
    "tiny-q-lora": MLAConfig(
        vocab_size=1000,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_embd=64,
        intermediate_size=176,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
    ),
    # DeepSeek-V2-Lite's attention and widths (paper Appendix B; HF `deepseek-ai/DeepSeek-V2-Lite`) with
    # every layer a dense SwiGLU of the checkpoint's first (dense) layer. The real model routes layers
    # 2-27 through MoE and extends RoPE with YaRN, so this size does not load that checkpoint.
    "deepseek-v2-lite-dense": MLAConfig(),
}


class LatentCache:
    """The compressed latent c_kv and the rotated rope key of every layer, preallocated for `max_len`.

    `c_kv`: (n_layer, B, max_len, kv_lora_rank), `k_rope`: (n_layer, B, max_len, dr). No per-head
    tensors are stored: that is the saving MLA exists for. `pos` tokens are filled; each forward
    writes at [pos, pos + T) and the model then advances `pos`.
    """

    def __init__(self, config: MLAConfig, batch_size: int, max_len: int, device=None, dtype=None):
        self.c_kv = torch.zeros(
            config.n_layer, batch_size, max_len, config.kv_lora_rank, device=device, dtype=dtype
        )
        self.k_rope = torch.zeros(
            config.n_layer, batch_size, max_len, config.qk_rope_head_dim, device=device, dtype=dtype
        )
        self.max_len = max_len
        self.pos = 0

    def update(
        self, layer: int, c_kv: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store c_kv (B, T, r) and k_rope (B, T, dr); return all so far: (B, pos+T, r), (B, pos+T, dr)."""
        end = self.pos + c_kv.size(1)
        if end > self.max_len:
            raise ValueError(f"latent cache holds {self.max_len} tokens; cannot grow to {end}")
        self.c_kv[layer, :, self.pos : end] = c_kv
        self.k_rope[layer, :, self.pos : end] = k_rope
        return self.c_kv[layer, :, :end], self.k_rope[layer, :, :end]


def causal_mask(t: int, start: int, device: torch.device) -> torch.Tensor:
    """(T, start+T) bool: the query at absolute position start+i may see keys 0..start+i."""
    return torch.ones(t, start + t, dtype=torch.bool, device=device).tril(diagonal=start)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, dr/2) of the angle m * theta_i for absolute positions m (T,)."""
    angles = positions[:, None].float() * inv_freq[None, :]  # (T, dr/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of x (..., T, dr) by its position's angle."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., T, dr/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


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


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        c, nh = config, config.n_head
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.n_embd, nh * c.qk_head_dim, bias=False)
        else:  # low-rank query, eqs. 12-13: saves activation memory in training, not cache
            self.q_a_proj = nn.Linear(c.n_embd, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, nh * c.qk_head_dim, bias=False)
        # W^DKV and W^KR stacked: h -> [c_kv ; k_rope]
        self.kv_a_proj_with_mqa = nn.Linear(c.n_embd, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS)
        # W^UK and W^UV, interleaved per head: c_kv -> [k_nope_h ; v_h] for h = 1..nh
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, nh * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * c.v_head_dim, c.n_embd, bias=False)
        self.scale = c.qk_head_dim**-0.5

    def queries(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q_nope (B, nh, T, dn), rotated q_rope (B, nh, T, dr)."""
        B, T, _ = x.shape
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)  # (B, T, nh*(dn+dr))
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # (B, T, nh*(dn+dr))
        q = q.view(B, T, self.config.n_head, self.config.qk_head_dim).transpose(1, 2)  # (B, nh, T, dn+dr)
        q_nope, q_rope = q.split([self.config.qk_nope_head_dim, self.config.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def latent(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> normalised latent c_kv (B, T, r), rotated shared key k_rope (B, T, dr)."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split(
            [self.config.kv_lora_rank, self.config.qk_rope_head_dim], -1
        )
        return self.kv_a_layernorm(c_kv), apply_rope(k_rope, cos, sin)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK (nh, dn, r) and W^UV (nh, dv, r), the per-head slices of kv_b_proj."""
        c = self.config
        w = self.kv_b_proj.weight.view(c.n_head, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rope = self.queries(x, cos, sin)
        c_kv, k_rope = self.latent(x, cos, sin)
        start = 0
        if cache is not None:
            start = cache.pos
            c_kv, k_rope = cache.update(self.layer_idx, c_kv, k_rope)  # (B, S, r), (B, S, dr)
        mask = causal_mask(T, start, x.device)  # (T, S)
        attend = self.attend_absorbed if cache is not None else self.attend_expanded
        y = attend(q_nope, q_rope, c_kv, k_rope, mask)  # (B, nh, T, dv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend_expanded(self, q_nope, q_rope, c_kv, k_rope, mask) -> torch.Tensor:
        """Paper eqs. 14-19: rebuild per-head keys (B, nh, S, dn+dr) and values (B, nh, S, dv)."""
        w_uk, w_uv = self.up_weights()
        k_nope = torch.einsum("bsr,hdr->bhsd", c_kv, w_uk)  # (B, nh, S, dn)
        v = torch.einsum("bsr,hdr->bhsd", c_kv, w_uv)  # (B, nh, S, dv)
        k_rope = k_rope[:, None].expand(-1, k_nope.size(1), -1, -1)  # (B, nh, S, dr), shared by heads
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope), dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask) -> torch.Tensor:
        """Sec. 2.1.2: fold W^UK into the query and W^UV into the output; attend over the latent.

        q_nope . (W^UK c) = (W^UK^T q_nope) . c, so each head's query moves into latent space and
        every head shares one key [c_kv ; k_rope] and one value c_kv: multi-query attention.
        """
        w_uk, w_uv = self.up_weights()
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, nh, T, r)
        q = torch.cat((q_latent, q_rope), dim=-1)  # (B, nh, T, r+dr)
        k = torch.cat((c_kv, k_rope), dim=-1)[:, None].expand(-1, q.size(1), -1, -1)  # (B, nh, S, r+dr)
        v = c_kv[:, None].expand(-1, q.size(1), -1, -1)  # (B, nh, S, r)
        o_latent = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, nh, T, r)
        return torch.einsum("bhtr,hdr->bhtd", o_latent, w_uv)  # (B, nh, T, dv)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), as in llama.py."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MLAModel(nn.Module):
    def __init__(self, config: MLAConfig):
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
        dr = config.qk_rope_head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dr, 2, dtype=torch.float) / dr))  # (dr/2,)
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

    def forward(self, idx: torch.Tensor, kv_cache: LatentCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(start, start + T, device=idx.device))  # (T, dr/2)
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
        cache = LatentCache(self.config, B, T + max_new_tokens, device=w.device, dtype=w.dtype)
        logits = self(idx, kv_cache=cache)[:, -1]  # (B, V)
        for i in range(T, T + max_new_tokens):
            out[:, i : i + 1] = sample_next(logits, temperature, top_k, top_p, generator)
            if i + 1 < T + max_new_tokens:
                logits = self(out[:, i : i + 1], kv_cache=cache)[:, -1]
        return out

    # ---- conversion to and from transformers.DeepseekV2ForCausalLM: the names already match ----

    @classmethod
    def from_hf(cls, hf_config: Any, state_dict: Mapping[str, torch.Tensor]) -> MLAModel:
        """A model holding a HF `DeepseekV2ForCausalLM` checkpoint; a CheckpointMismatchError names the
        tensors that do not fit `hf_config`."""
        model = cls(MLAConfig.from_hf(hf_config))
        sd = _with_tied_head(state_dict, model.config.tie_word_embeddings)
        check_state_dict(_shapes(model), sd, source=f"HF {HF_CLASS} state dict")
        model.load_state_dict(sd)
        return model

    def to_hf_state_dict(
        self, tensors: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """This model's tensors, or `tensors` keyed like them (e.g. gradients, possibly only some),
        keyed as `DeepseekV2ForCausalLM` loads them (the same names; a tied lm_head filled in)."""
        sd = _with_tied_head(self.state_dict() if tensors is None else tensors, self.config.tie_word_embeddings)
        check_state_dict(_shapes(self), sd, source="MLA tensors", allow_missing=True)
        return sd


# --- helpers of the conversion ------------------------------------------------------------------


def _shapes(model: MLAModel) -> dict[str, tuple[int, ...]]:
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
