"""The original encoder-decoder Transformer, written from the paper.

Vaswani, Shazeer, Parmar, Uszkoreit, Jones, Gomez, Kaiser, Polosukhin.
"Attention Is All You Need." NeurIPS 2017 (arXiv:1706.03762).

What it is: N encoder layers (self-attention, feed-forward) and N decoder
layers (causal self-attention, attention over the encoder output, feed-forward).
Each sub-layer is wrapped as ``LayerNorm(x + Dropout(Sublayer(x)))`` (post-LN,
Sec. 3.1 and 5.4). Positions are fixed sinusoids added to the token embeddings
(Sec. 3.5); the embeddings are multiplied by sqrt(d_model) and one matrix is
shared by the encoder input, the decoder input and the pre-softmax projection
(Sec. 3.4). The feed-forward network is ``max(0, x W1 + b1) W2 + b2`` (Sec. 3.3).
Training uses label smoothing eps_ls = 0.1 (Sec. 5.4; `label_smoothed_nll`) and
the warm-up/inverse-square-root learning rate of Sec. 5.3 (`noam_lr`).

Reference implementation: ``transformers.MarianMTModel`` configured by
`TransformerConfig.to_hf_kwargs` (Marian is the C++ NMT toolkit whose default model is
this Transformer; Junczys-Dowmunt et al. 2018). Parameter names below follow
Marian's, so checkpoint conversion is a short name map (`_hf_names`):
`Transformer.from_hf` loads a Marian checkpoint, `Transformer.to_hf_state_dict` maps back.

Where this file follows Marian rather than the paper's text, and why:

* Sinusoid layout. The paper interleaves, PE(pos, 2i) = sin, PE(pos, 2i+1) = cos.
  Marian concatenates: all sines in the first half, all cosines in the second,
  with the same frequencies 1/10000^(2i/d_model). We use Marian's layout. It is
  a fixed permutation of the d_model coordinates; permuting every weight the
  same way turns one network into the other (LayerNorm, attention and the
  feed-forward layers are all equivariant to it), so the two define the same
  model family and only the checkpoint layout differs.
* Biases. The paper writes the attention projections W^Q, W^K, W^V, W^O
  without biases; Marian (like fairseq and tensor2tensor's later versions) has
  them. We keep them: 4 * d_model extra parameters per attention block.
* LayerNorm epsilon is 1e-5 (PyTorch's default, as in Marian); the paper does
  not give one.
* The padding row. ``nn.Embedding(padding_idx=pad_id)`` gets no gradient from
  the input lookup (it still gets one through the tied output projection).
  The paper has no padding token; Marian does this, so we do too.
* Output bias. Marian adds a buffer ``final_logits_bias`` to the logits; the
  paper has none. `to_hf_state_dict` writes zeros and `from_hf` refuses a
  checkpoint whose bias is not zero.
* Decoder start. Marian starts decoding from ``decoder_start_token_id`` (its
  pad id in released checkpoints); the paper does not say. Here the caller
  passes ``bos_id`` and `to_hf_kwargs` sets Marian's start id to it.
* Dropout. Only the paper's two dropouts exist (on each sub-layer output and on
  the embedding + position sums); `to_hf_kwargs` sets Marian's ``attention_dropout``
  and ``activation_dropout`` to 0, and `from_hf` refuses configs that use them.
* Position table length. The sinusoids have no length limit; we precompute
  ``max_len`` rows (Marian's ``max_position_embeddings``).
* Initialisation (not compared against Marian, whose weights we copy in the
  tests): Xavier-uniform linear weights, zero biases and N(0, d_model^-0.5)
  embeddings, so that scaled embeddings have unit variance (tensor2tensor's
  choice; the paper does not state one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reproductions.common import CheckpointMismatchError, check_state_dict, sample_next

HF_CLASS = "MarianMTModel"  # the reference: transformers.MarianMTModel, configured by to_hf_kwargs


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 37000  # shared source-target BPE vocabulary (Sec. 5.1, WMT'14 En-De: ~37000)
    d_model: int = 512
    n_layer: int = 6  # N: layers in the encoder and, separately, in the decoder
    n_head: int = 8  # h
    d_ff: int = 2048  # inner size of the feed-forward network
    dropout: float = 0.1  # P_drop: on sub-layer outputs and on embedding + position sums
    max_len: int = 1024  # rows of the precomputed sinusoid table
    pad_id: int = 0  # padding token: masked in attention, no embedding gradient from lookups

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:  # d_k = d_v = d_model / h
        return self.d_model // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> TransformerConfig:
        if name not in name_to_config:
            raise ValueError(f"unknown Transformer size {name!r}; known: {', '.join(sorted(name_to_config))}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {', '.join(sorted(fields))}")
        return dataclasses.replace(name_to_config[name], **overrides)

    @classmethod
    def from_hf(cls, hf_config: Any) -> TransformerConfig:
        """Read a `transformers.MarianConfig`, refusing what this file does not compute."""
        hf = hf_config
        unsupported = {
            "activation_function != relu": hf.activation_function != "relu",
            "scale_embedding off": not hf.scale_embedding,
            "untied embeddings": not (hf.share_encoder_decoder_embeddings and hf.tie_word_embeddings),
            "separate decoder vocabulary": (hf.decoder_vocab_size or hf.vocab_size) != hf.vocab_size,
            "encoder and decoder shapes differ": (hf.encoder_layers, hf.encoder_attention_heads, hf.encoder_ffn_dim)
            != (hf.decoder_layers, hf.decoder_attention_heads, hf.decoder_ffn_dim),
            "attention or activation dropout": bool(hf.attention_dropout or hf.activation_dropout),
        }
        if any(unsupported.values()):
            raise ValueError(
                f"cannot reproduce this Marian config: {', '.join(k for k, v in unsupported.items() if v)}"
            )
        return cls(vocab_size=hf.vocab_size, d_model=hf.d_model, n_layer=hf.encoder_layers,
                   n_head=hf.encoder_attention_heads, d_ff=hf.encoder_ffn_dim, dropout=hf.dropout,
                   max_len=hf.max_position_embeddings, pad_id=hf.pad_token_id)

    def to_hf_kwargs(self, bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Any]:
        """Keyword arguments of a `transformers.MarianConfig` computing exactly this module (see the
        module docstring); bos_id is the decoder start token (default: pad_id, as released Marian)."""
        return dict(
            vocab_size=self.vocab_size,
            decoder_vocab_size=self.vocab_size,
            d_model=self.d_model,
            encoder_layers=self.n_layer,
            decoder_layers=self.n_layer,
            encoder_attention_heads=self.n_head,
            decoder_attention_heads=self.n_head,
            encoder_ffn_dim=self.d_ff,
            decoder_ffn_dim=self.d_ff,
            max_position_embeddings=self.max_len,
            activation_function="relu",
            scale_embedding=True,  # embeddings * sqrt(d_model)
            dropout=self.dropout,
            attention_dropout=0.0,
            activation_dropout=0.0,
            encoder_layerdrop=0.0,
            decoder_layerdrop=0.0,
            pad_token_id=self.pad_id,
            decoder_start_token_id=self.pad_id if bos_id is None else bos_id,
            bos_token_id=None,
            eos_token_id=eos_id,
            forced_eos_token_id=None,
            share_encoder_decoder_embeddings=True,
            tie_word_embeddings=True,
        )


name_to_config: dict[str, TransformerConfig] = {
    # for tests: fast on a CPU
    "tiny": TransformerConfig(vocab_size=96, d_model=32, n_layer=2, n_head=4, d_ff=64, max_len=64),
    # Vaswani et al. 2017, Table 3 row "base": 65M parameters there, 63.1M here with 37000 tokens
    "base": TransformerConfig(d_model=512, n_layer=6, n_head=8, d_ff=2048, dropout=0.1),
    # Table 3 row "big" (P_drop 0.3 for En-De, Sec. 6.1): 213M there, 214.2M here
    "big": TransformerConfig(d_model=1024, n_layer=6, n_head=16, d_ff=4096, dropout=0.3),
}


def sinusoids(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim) table: sin(pos / 10000^(2i/dim)) in the first half, cos of the same in the second."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]  # (P, 1)
    sin_exp = torch.arange(0, dim, 2, dtype=torch.float64)  # 2i for the sines: ceil(dim / 2) of them
    cos_exp = torch.arange(1, dim, 2, dtype=torch.float64) - 1  # 2i for the cosines: floor(dim / 2)
    sin = torch.sin(pos / 10000 ** (sin_exp / dim))
    cos = torch.cos(pos / 10000 ** (cos_exp / dim))
    return torch.cat([sin, cos], dim=1).float()  # (P, dim)


@dataclass
class LayerCache:
    """One decoder layer's keys and values during incremental decoding."""

    k: torch.Tensor  # (B, nh, T_max, hs) self-attention keys, preallocated
    v: torch.Tensor  # (B, nh, T_max, hs)
    cross_k: torch.Tensor | None = None  # (B, nh, S, hs), computed from the memory once
    cross_v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"decoder cache holds {self.k.size(2)} positions; asked to write up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass
class DecoderCache:
    layers: list[LayerCache]
    length: int = 0  # target positions already written


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_k)) V over h heads (Sec. 3.2.2); keys and values are projected by the caller."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))  # 2 x (B, nh, S, hs)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        q = self.heads(self.q_proj(x))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, S)
        if mask is not None:  # True where attending is allowed; broadcast to (B, nh, T, S)
            att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
        y = att.softmax(dim=-1) @ v  # (B, nh, T, hs)
        B, _, T, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class EncoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        k, v = self.self_attn.keys_values(x)
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, k, v, src_mask)))
        return self.final_layer_norm(x + self.dropout(self.fc2(F.relu(self.fc1(x)))))  # (B, S, C)


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.encoder_attn = MultiHeadAttention(config)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, memory, src_mask, tgt_mask, cache: LayerCache | None = None, start: int = 0):
        k, v = self.self_attn.keys_values(x)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v, start)  # (B, nh, start + T, hs)
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, k, v, tgt_mask)))
        ck, cv = self.cross_keys_values(memory, cache)
        x = self.encoder_attn_layer_norm(x + self.dropout(self.encoder_attn(x, ck, cv, src_mask)))
        return self.final_layer_norm(x + self.dropout(self.fc2(F.relu(self.fc1(x)))))  # (B, T, C)

    def cross_keys_values(self, memory: torch.Tensor, cache: LayerCache | None):
        if cache is None:
            return self.encoder_attn.keys_values(memory)
        if cache.cross_k is None:  # first step: project the encoder output once
            cache.cross_k, cache.cross_v = self.encoder_attn.keys_values(memory)
        return cache.cross_k, cache.cross_v


class Stack(nn.Module):
    """Holds `layers` so that names read `encoder.layers.0...` as in Marian."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        self.encoder = Stack([EncoderLayer(config) for _ in range(config.n_layer)])
        self.decoder = Stack([DecoderLayer(config) for _ in range(config.n_layer)])
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer("positions", sinusoids(config.max_len, config.d_model), persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.d_model**-0.5)
            with torch.no_grad():
                module.weight[self.config.pad_id].zero_()

    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = ids.size(1)
        if start + T > self.config.max_len:
            raise ValueError(f"sequence of {start + T} positions exceeds max_len={self.config.max_len}")
        x = self.shared(ids) * math.sqrt(self.config.d_model)  # (B, T, C)
        return self.dropout(x + self.positions[start : start + T])

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) ids, src_mask (B, S) 1 for real tokens -> memory (B, S, C)."""
        x, mask = self.embed(src), _key_mask(src_mask)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return x

    def decode(self, tgt, memory, src_mask=None, cache: DecoderCache | None = None) -> torch.Tensor:
        """tgt (B, T) ids (only the new ones when `cache` is given) -> logits (B, T, V)."""
        start = cache.length if cache is not None else 0
        x, mask = self.embed(tgt, start), _key_mask(src_mask)
        T = tgt.size(1)
        causal = torch.ones(T, start + T, dtype=torch.bool, device=tgt.device).tril(start)  # (T, start + T)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, memory, mask, causal, cache.layers[i] if cache is not None else None, start)
        if cache is not None:
            cache.length += T
        return x @ self.shared.weight.T  # (B, T, V): the output projection is the shared embedding

    def forward(self, src, tgt, src_mask=None) -> torch.Tensor:
        """src (B, S), tgt (B, T) (decoder input: the target shifted right) -> logits (B, T, V)."""
        return self.decode(tgt, self.encode(src, src_mask), src_mask)

    def new_cache(self, batch_size: int, max_len: int) -> DecoderCache:
        c, w = self.config, self.shared.weight
        shape = (batch_size, c.n_head, max_len, c.head_dim)
        return DecoderCache([LayerCache(w.new_zeros(shape), w.new_zeros(shape)) for _ in range(c.n_layer)])

    @torch.no_grad()
    def generate(
        self,
        src: torch.Tensor,
        max_new_tokens: int,
        bos_id: int,
        eos_id: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        src_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, S) source -> (B, 1 + n) target starting with bos_id; after eos a row is filled with pad_id.

        Greedy at temperature 0. Stops early once every row has produced eos.
        """
        memory = self.encode(src, src_mask)
        cache = self.new_cache(src.size(0), max_new_tokens)
        out = torch.full((src.size(0), 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        for _ in range(max_new_tokens):
            logits = self.decode(out[:, -1:], memory, src_mask, cache)[:, -1]  # (B, V)
            nxt = sample_next(logits, temperature, top_k, top_p, generator).squeeze(1)  # (B,)
            nxt = nxt.masked_fill(done, self.config.pad_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_id is not None:
                done |= nxt == eos_id
                if done.all():
                    break
        return out

    # ---- conversion to and from transformers.MarianMTModel ------------------------------------

    @classmethod
    def from_hf(cls, hf_config: Any, state_dict: Mapping[str, torch.Tensor]) -> Transformer:
        """A model holding a MarianMTModel checkpoint; CheckpointMismatchError if it is not this architecture."""
        model = cls(TransformerConfig.from_hf(hf_config))
        sd = dict(state_dict)
        extras = {k: sd.pop(k) for k in _MARIAN_EXTRAS if k in sd}
        names = {name: _hf_names(name)[0] for name, _ in model.named_parameters()}  # ours -> Marian's
        shapes = {hf: model.get_parameter(name).shape for name, hf in names.items()}
        check_state_dict(shapes, sd, source="Marian checkpoint")
        _check_extras(extras, sd["model.shared.weight"], model.positions)
        model.load_state_dict({name: sd[hf] for name, hf in names.items()}, strict=True)
        return model

    def to_hf_state_dict(self, tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """No argument: the state dict `MarianMTModel` loads with strict=True (the shared embedding under
        its four tied names, a zero final_logits_bias, the sinusoid tables). `tensors` keyed like our
        parameters (e.g. gradients, possibly only some): each under its Marian parameter name, the
        shared embedding once, as `model.shared.weight` (Marian's named_parameters reports one)."""
        if tensors is not None:
            own = {k: p.shape for k, p in self.named_parameters()}
            check_state_dict(own, tensors, source="Transformer tensors", allow_missing=True)
            return {_hf_names(k)[0]: v for k, v in tensors.items()}
        sd = {hf: p.detach() for name, p in self.named_parameters() for hf in _hf_names(name)}
        sd["final_logits_bias"] = torch.zeros(1, self.config.vocab_size)
        for side in ("encoder", "decoder"):
            sd[f"model.{side}.embed_positions.weight"] = self.positions.clone()
        return sd


def _hf_names(name: str) -> list[str]:
    """Our parameter name -> its names in MarianMTModel (the shared embedding has four)."""
    if name == "shared.weight":
        return ["model.shared.weight", *_MARIAN_TIED]
    return [f"model.{name}"]


# Tensors Marian stores that we tie or compute: optional in a checkpoint, checked when present.
_MARIAN_TIED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
_MARIAN_POSITIONS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")
_MARIAN_EXTRAS = (*_MARIAN_TIED, *_MARIAN_POSITIONS, "final_logits_bias")


def _check_extras(extras: dict[str, torch.Tensor], shared: torch.Tensor, positions: torch.Tensor) -> None:
    for key in _MARIAN_TIED:
        if key in extras and not torch.equal(extras[key], shared):
            raise CheckpointMismatchError(f"{key} differs from model.shared.weight; we need tied embeddings")
    for key in _MARIAN_POSITIONS:
        pos = extras.get(key)
        if pos is not None and (pos.shape != positions.shape or not torch.allclose(pos, positions)):
            raise CheckpointMismatchError(f"{key} is not our sinusoid table (sin half, then cos half)")
    bias = extras.get("final_logits_bias")
    if bias is not None and bias.any():
        raise CheckpointMismatchError("final_logits_bias is not zero; the paper's output layer has no bias")


def _key_mask(src_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) with 1 for real tokens -> (B, 1, 1, S) bool, broadcast over heads and queries."""
    return None if src_mask is None else src_mask.bool()[:, None, None, :]


def label_smoothed_nll(
    logits: torch.Tensor, target: torch.Tensor, eps: float = 0.1, ignore_index: int = -100
) -> torch.Tensor:
    """Mean over non-ignored tokens of cross-entropy against (1 - eps) one-hot + eps uniform (Sec. 5.4).

    The uniform part spreads eps over all V classes, the true one included (Szegedy et al. 2016;
    the same convention as `F.cross_entropy(label_smoothing=eps)`).
    """
    logp = logits.log_softmax(dim=-1)  # (..., V)
    keep = target != ignore_index  # (...)
    nll = -logp.gather(-1, target.masked_fill(~keep, 0).unsqueeze(-1)).squeeze(-1)  # (...)
    smooth = -logp.mean(dim=-1)  # (...)
    loss = (1.0 - eps) * nll + eps * smooth
    return loss[keep].mean()


def noam_lr(step: int, d_model: int = 512, warmup: int = 4000) -> float:
    """lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (Sec. 5.3); 0 at step 0."""
    if step <= 0:
        return 0.0
    return d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
