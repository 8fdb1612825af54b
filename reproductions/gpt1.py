"""GPT-1: the original generatively pre-trained Transformer decoder.

Radford, Narasimhan, Salimans & Sutskever (2018), "Improving Language Understanding by
Generative Pre-Training". A 12-layer, 768-wide, 12-head decoder-only Transformer (117M
parameters) trained on BooksCorpus with a 40,478-token BPE vocabulary and 512 positions.

The block, in the paper's notation (Sec. 3.1 and the released code):

    h_0 = U W_e + W_p                        learned token and position embeddings
    h_l = ln_2(n + mlp(n)),  n = ln_1(h_{l-1} + attn(h_{l-1}))      post-LayerNorm
    P(u) = softmax(h_n W_e^T)                output layer tied to the token embedding

What GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners")
later changed, so that `diff gpt1.py gpt2.py` shows it:
  * LayerNorm moved to the *input* of each sub-block (pre-LN), plus a final LayerNorm
    `ln_f` after the last block; GPT-1 has neither (residual stream is normalised after
    each addition instead).
  * residual projections initialised with std scaled by 1/sqrt(2 * n_layer).
  * context 512 -> 1024, vocabulary 40,478 -> 50,257 (byte-level BPE), up to 48 layers.

Parity target: `transformers.OpenAIGPTLMHeadModel`. Parameter names follow it
(`tokens_embed`, `positions_embed`, `h.{i}.attn.c_attn`, `ln_1` after attention, ...), so
loading is a name map; the one layout difference is that HF stores `c_attn`/`c_proj`/`c_fc`
as `Conv1D` with weight (in, out), while here they are `nn.Linear` with weight (out, in).
Known differences from the reference, none of which change the logits:
  * HF masks future positions with -1e4 before the softmax; here they are -inf (exactly 0
    weight instead of exp(-1e4) ~ 0).
  * HF reuses `tokens_embed` for optional `token_type_ids` (the paper's delimiter trick for
    fine-tuning); this reproduction covers the language model only.
  * HF has no KV cache for GPT-1; this file adds one for fast `generate`.
The activation is the tanh approximation of GELU, which HF calls `gelu_new` and selects
with `afn="gelu"` for this model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reproductions.common import CheckpointMismatchError, check_state_dict, sample_next

HF_CLASS = "OpenAIGPTLMHeadModel"  # the reference: transformers.OpenAIGPTLMHeadModel


@dataclass(frozen=True)
class GPT1Config:
    vocab_size: int = 40478  # 40,000 BPE merges + 478 base characters
    block_size: int = 512  # number of learned positions = longest context
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1  # residual, embedding and attention dropout (all 0.1 in the paper)
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_floats_per_token(self) -> int:
        """Numbers the KV cache stores per token across all layers (keys and values)."""
        return 2 * self.n_layer * self.n_embd

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPT1Config:
        if name not in name_to_config:
            raise ValueError(f"unknown GPT-1 size {name!r}; choose one of: {', '.join(name_to_config)}")
        return replace(name_to_config[name], **overrides)

    @classmethod
    def from_hf(cls, hf_config: Any) -> GPT1Config:
        """Read a `transformers.OpenAIGPTConfig`."""
        if hf_config.afn != "gelu":
            raise ValueError(f"only afn='gelu' (tanh GELU) is reproduced, got {hf_config.afn!r}")
        return cls(
            vocab_size=hf_config.vocab_size,
            block_size=hf_config.n_positions,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_embd=hf_config.n_embd,
            dropout=hf_config.resid_pdrop,
            layer_norm_eps=hf_config.layer_norm_epsilon,
        )

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the equivalent `transformers.OpenAIGPTConfig`."""
        return dict(
            vocab_size=self.vocab_size,
            n_positions=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            afn="gelu",
            resid_pdrop=self.dropout,
            embd_pdrop=self.dropout,
            attn_pdrop=self.dropout,
            layer_norm_epsilon=self.layer_norm_eps,
        )


name_to_config: dict[str, GPT1Config] = {
    # test size: small enough for CPU parity tests in well under a second
    "tiny": GPT1Config(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64),
    # Radford et al. 2018, Sec. 4.1 "Model specifications"; HF `openai-community/openai-gpt`
    "gpt1": GPT1Config(),
}


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` tokens.

    `k`, `v`: (n_layer, B, nh, max_len, hs). `pos` tokens are filled; each forward writes
    its new tokens at [pos, pos + T) and the model then advances `pos`.
    """

    def __init__(self, config: GPT1Config, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) for `layer`; return all keys/values so far (B, nh, pos+T, hs)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot grow to {end}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def causal_mask(t: int, start: int, device: torch.device) -> torch.Tensor:
    """(T, start+T) bool: the query at absolute position start+i may see keys 0..start+i."""
    return torch.ones(t, start + t, dtype=torch.bool, device=device).tril(diagonal=start)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT1Config, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        heads = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q, k, v = heads(q), heads(k), heads(v)
        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, start+T, hs)
        mask = causal_mask(T, start, x.device)  # (T, S)
        p_drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT1Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Post-LN block: LayerNorm after each residual addition (GPT-2 moves it before)."""

    def __init__(self, config: GPT1Config, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, kv_cache))
        return self.ln_2(x + self.mlp(x))


class GPT1(nn.Module):
    def __init__(self, config: GPT1Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                tokens_embed=nn.Embedding(config.vocab_size, config.n_embd),  # W_e
                positions_embed=nn.Embedding(config.block_size, config.n_embd),  # W_p
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            )
        )  # no final LayerNorm: GPT-2 adds `ln_f`
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """N(0, 0.02) weights and zero biases (paper Sec. 4.1); LayerNorm keeps (1, 0)."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        tok_emb = self.transformer.tokens_embed(idx)  # (B, T, C)
        pos_emb = self.transformer.positions_embed(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return x @ self.transformer.tokens_embed.weight.T  # (B, T, vocab): tied output layer h W_e^T

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
        """Extend idx (B, T) by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

        Greedy at temperature 0. Learned positions cap prompt + new tokens at block_size.
        """
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt ({T}) + max_new_tokens ({max_new_tokens}) tokens exceeds "
                f"block_size {self.config.block_size}"
            )
        out = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)
        out[:, :T] = idx
        if max_new_tokens == 0:
            return out
        w = self.transformer.tokens_embed.weight
        cache = KVCache(self.config, B, T + max_new_tokens, device=w.device, dtype=w.dtype)
        logits = self(idx, kv_cache=cache)[:, -1]  # (B, V)
        for i in range(T, T + max_new_tokens):
            out[:, i : i + 1] = sample_next(logits, temperature, top_k, top_p, generator)
            if i + 1 < T + max_new_tokens:
                logits = self(out[:, i : i + 1], kv_cache=cache)[:, -1]
        return out

    # ---- conversion to and from transformers.OpenAIGPTLMHeadModel -----------------------------

    @classmethod
    def from_hf(cls, hf_config: Any, state_dict: Mapping[str, torch.Tensor]) -> GPT1:
        """A model holding a HF `OpenAIGPTLMHeadModel` (or hub `OpenAIGPTModel`) checkpoint; a
        CheckpointMismatchError names the tensors that do not fit `hf_config`."""
        model = cls(GPT1Config.from_hf(hf_config))
        sd = _normalise_hf_keys(state_dict)
        head = sd.pop("lm_head.weight", None)  # a tied copy of tokens_embed: GPT1 multiplies by W_e^T itself
        embed = sd.get("transformer.tokens_embed.weight")
        if head is not None and embed is not None and head is not embed and not torch.equal(head, embed):
            raise CheckpointMismatchError(
                "lm_head.weight differs from transformer.tokens_embed.weight; GPT-1 ties them"
            )
        hf_shapes = {k: s[::-1] if k.endswith(_CONV1D_WEIGHTS) else s for k, s in _shapes(model).items()}
        check_state_dict(hf_shapes, sd, source=f"HF {HF_CLASS} state dict")
        model.load_state_dict(_transpose_conv1d(sd))
        return model

    def to_hf_state_dict(
        self, tensors: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """This model's tensors, or `tensors` keyed like them (e.g. gradients, possibly only some),
        in `OpenAIGPTLMHeadModel`'s names and layouts, with the tied lm_head."""
        sd = self.state_dict() if tensors is None else tensors
        check_state_dict(_shapes(self), sd, source="GPT-1 tensors", allow_missing=True)
        hf_sd = _transpose_conv1d(sd)
        if "transformer.tokens_embed.weight" in hf_sd:
            hf_sd["lm_head.weight"] = hf_sd["transformer.tokens_embed.weight"]
        return hf_sd


# --- helpers of the conversion -------------------------------------------------------------

_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _shapes(model: GPT1) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _normalise_hf_keys(hf_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the `transformer.` prefix that hub files of the bare `OpenAIGPTModel` omit; drop mask buffers."""
    sd = {}
    for k, v in hf_sd.items():
        if k.endswith(".attn.bias"):
            continue  # the causal-mask buffer older transformers versions saved, not a weight
        sd[k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"] = v
    return sd


def _transpose_conv1d(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Conv1D weight (in, out) <-> nn.Linear weight (out, in); every other tensor unchanged."""
    return {k: v.t().contiguous() if k.endswith(_CONV1D_WEIGHTS) else v for k, v in sd.items()}
