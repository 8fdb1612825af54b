"""GPT-2, written from scratch in PyTorch.

Paper: Radford, Wu, Child, Luan, Amodei, Sutskever (2019), "Language Models are
Unsupervised Multitask Learners". Architecture details are in section 2.3 of
the paper; head counts and the context size come from the released
`hparams.json` files of github.com/openai/gpt-2.

What changed from GPT-1 (Radford et al. 2018), all visible below:
  * LayerNorm moved to the input of each sub-block (pre-LN: `x + attn(ln_1(x))`)
    instead of after the residual add;
  * an extra LayerNorm (`ln_f`) after the last block;
  * residual projections (`c_proj`) initialised with std 0.02 / sqrt(2 * n_layer),
    one factor of 2 per residual branch (attention and MLP) in a block;
  * context grown from 512 to 1024 tokens, and a byte-level BPE vocabulary of
    50,257 tokens (GPT-1: 40,478);
  * the output head is tied to the token embedding `wte`.

Parameter names match the OpenAI / Hugging Face checkpoint, so loading one is a
name map plus a transpose: HF stores these projections as `Conv1D` with weights
of shape (in, out); we use `nn.Linear`, whose weights are (out, in). `GPT2.from_hf`
loads a reference checkpoint and `GPT2.to_hf_state_dict` maps back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from reproductions.common import CheckpointMismatchError, check_state_dict, sample_next

HF_CLASS = "GPT2LMHeadModel"  # the reference: transformers.GPT2LMHeadModel

# Suffixes of the weights HF stores as Conv1D (in, out): transposed on conversion.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257  # 256 bytes + 50,000 BPE merges + <|endoftext|>
    block_size: int = 1024  # maximum context length (number of learned positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # one rate for embeddings, attention probs and residuals (0.1 in pretraining)
    layer_norm_eps: float = 1e-5
    bias: bool = True  # biases in Linear and LayerNorm, as in the released checkpoints

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPT2Config:
        if name not in name_to_config:
            raise ValueError(f"unknown GPT-2 size {name!r}; known: {', '.join(name_to_config)}")
        return cls(**{**name_to_config[name], **overrides})

    @classmethod
    def from_hf(cls, hf_config) -> GPT2Config:
        """Build from a `transformers.GPT2Config`; refuses variants this file does not implement."""
        rates = {hf_config.resid_pdrop, hf_config.embd_pdrop, hf_config.attn_pdrop}
        if len(rates) != 1:
            raise ValueError(f"GPT-2 here uses one dropout rate; got resid/embd/attn {sorted(rates)}")
        if hf_config.activation_function != "gelu_new":
            raise ValueError(f"only 'gelu_new' is implemented, got {hf_config.activation_function!r}")
        if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
            raise ValueError(f"only n_inner = 4 * n_embd is implemented, got {hf_config.n_inner}")
        return cls(vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions,
                   n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
                   dropout=rates.pop(), layer_norm_eps=hf_config.layer_norm_epsilon)

    def to_hf_kwargs(self) -> dict:
        """Keyword arguments of the equivalent `transformers.GPT2Config` (<|endoftext|>, the last
        token, is BOS and EOS)."""
        if not self.bias:
            raise ValueError("transformers' GPT-2 always has biases; cannot export bias=False")
        eot = self.vocab_size - 1
        return dict(vocab_size=self.vocab_size, n_positions=self.block_size, n_embd=self.n_embd,
                    n_layer=self.n_layer, n_head=self.n_head, n_inner=None,
                    activation_function="gelu_new", resid_pdrop=self.dropout,
                    embd_pdrop=self.dropout, attn_pdrop=self.dropout,
                    layer_norm_epsilon=self.layer_norm_eps, tie_word_embeddings=True,
                    bos_token_id=eot, eos_token_id=eot)


name_to_config: dict[str, dict] = {
    # Test size: small vocabulary and context so the parity tests run in well under a second.
    "tiny": dict(vocab_size=1000, block_size=64, n_layer=2, n_head=2, n_embd=32),
    # Paper Table 2 (layers, d_model; the paper's 117M/345M/762M/1542M were later corrected to
    # the counts below) and openai/gpt-2 models/*/hparams.json (n_head).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124,439,808 parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 354,823,168
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774,030,080
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1,557,611,200
}


class KVCache:
    """Preallocated keys and values for every layer, written in place; `pos` counts tokens seen."""

    def __init__(self, config: GPT2Config, batch_size: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)  # (B, nh, L, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions pos..pos+T-1; return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, pos+T, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, kv_cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hs), S = cached + T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GELU (Hendrycks & Gimpel 2016) with the tanh approximation that GPT-2 used ("gelu_new").
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, kv_cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), mask, kv_cache, layer)  # pre-LN: normalise the branch input
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # two residual branches per block
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, tied head counted once; non_embedding drops the position table (wte is the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab).

        attention_mask (B, S), S = cached + T: 1 = real token, 0 = padding (right padding only).
        """
        return self.lm_head(self.hidden_states(idx, kv_cache, attention_mask))  # (B, T, vocab)

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> final hidden states (B, T, C) after ln_f: what the LM head reads."""
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.pos
        limit = self.config.block_size if kv_cache is None else min(kv_cache.max_len, self.config.block_size)
        if start + T > limit:
            raise ValueError(f"sequence of {start + T} tokens exceeds the limit of {limit}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        mask = self._attention_mask(start, T, attention_mask, idx.device)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)  # (B, T, C)

    @staticmethod
    def _attention_mask(start: int, T: int, attention_mask, device) -> torch.Tensor | None:
        """Boolean (T, S) or (B, 1, T, S) mask, True = may attend; None means plain causal from 0."""
        if start == 0 and attention_mask is None:
            return None  # let SDPA use its fused causal path
        q_pos = torch.arange(start, start + T, device=device)
        mask = torch.arange(start + T, device=device)[None, :] <= q_pos[:, None]  # (T, S)
        if attention_mask is not None:
            if attention_mask.size(-1) != start + T:
                raise ValueError(f"attention_mask has {attention_mask.size(-1)} tokens, expected {start + T}")
            mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        return mask

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens: one prefill, then one cached token per step."""
        B, T = idx.shape
        total = T + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds "
                             f"block_size {self.config.block_size}")
        cache = KVCache(self.config, B, total, device=idx.device, dtype=self.lm_head.weight.dtype)
        # Speed: the LM head (a third of GPT-2 small's FLOPs) runs only on the last prompt position.
        logits = self.lm_head(self.hidden_states(idx, cache)[:, -1])  # (B, vocab)
        out = [idx]
        for step in range(max_new_tokens):
            out.append(sample_next(logits, temperature, top_k, top_p, generator))  # (B, 1)
            if step + 1 < max_new_tokens:
                logits = self.lm_head(self.hidden_states(out[-1], cache)[:, -1])
        return torch.cat(out, dim=1)  # (B, T + max_new_tokens)

    # ---- conversion to and from transformers.GPT2LMHeadModel ----------------------------------

    @classmethod
    def from_hf(cls, hf_config, state_dict: Mapping[str, torch.Tensor]) -> GPT2:
        """A model holding a HF `GPT2LMHeadModel` (or hub `GPT2Model`) checkpoint; a
        CheckpointMismatchError names the tensors that do not fit `hf_config`."""
        with torch.device("meta"):  # no random init (2.8 s at 124M): every tensor is loaded below
            model = cls(GPT2Config.from_hf(hf_config))
        sd = _normalise_hf_keys(state_dict)
        check_state_dict(_hf_shapes(model), sd, source="HF GPT-2 checkpoint")
        head, wte = sd["lm_head.weight"], sd["transformer.wte.weight"]
        if head is not wte and not torch.equal(head, wte):
            raise CheckpointMismatchError("HF GPT-2 checkpoint has an lm_head.weight that is not tied to wte")
        sd = {k: v if k.endswith(CONV1D_WEIGHTS) else v.clone() for k, v in _transpose_conv1d(sd).items()}
        model.load_state_dict(sd, assign=True)  # our own copies (the Conv1D transposes are new already)
        model.lm_head.weight = model.transformer.wte.weight  # assign gave the head its own tensor: tie again
        return model

    def to_hf_state_dict(self, tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """This model's tensors, or `tensors` keyed like them (e.g. gradients, possibly only some),
        in the names and layouts `GPT2LMHeadModel` loads: Conv1D weights transposed, tied lm_head added."""
        sd = dict(self.state_dict() if tensors is None else tensors)
        if "transformer.wte.weight" in sd:
            sd.setdefault("lm_head.weight", sd["transformer.wte.weight"])  # absent from named_parameters()
        own = {k: v.shape for k, v in self.state_dict().items()}
        check_state_dict(own, sd, source="GPT-2 tensors", allow_missing=True)
        return _transpose_conv1d(sd)


def _hf_shapes(model: GPT2) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the equivalent GPT2LMHeadModel: ours, with the Conv1D weights (in, out)."""
    return {k: tuple(v.shape)[::-1] if k.endswith(CONV1D_WEIGHTS) else tuple(v.shape)
            for k, v in model.state_dict().items()}


def _normalise_hf_keys(hf_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the `transformer.` prefix the hub files omit, drop mask buffers, restore the tied head."""
    sd = {}
    for k, v in hf_sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions, not weights
        sd[k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"] = v
    if "transformer.wte.weight" in sd:
        sd.setdefault("lm_head.weight", sd["transformer.wte.weight"])
    return sd


def _transpose_conv1d(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Conv1D weight (in, out) <-> nn.Linear weight (out, in); every other tensor unchanged."""
    return {k: v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v for k, v in sd.items()}
