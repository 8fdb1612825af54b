"""A user's GPT-2 in the nanoGPT style, checked against the reference with no glue but a two-line factory.

    harness run --model examples/nanogpt_gpt2.py:build --reference gpt2-hf --tasks parity --weights random:tiny
    harness run --model examples/nanogpt_gpt2.py:build_buggy --reference gpt2-hf --tasks parity --weights random:tiny

GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", Section 2.3): a
decoder-only Transformer with pre-LN blocks (LayerNorm at the input of each sub-block), a final
LayerNorm, learned positions and an output head tied to the token embedding. The activation is GELU
(Hendrycks & Gimpel 2016) in its tanh approximation, as the released model used it.

Written the way nanoGPT's `model.py` lays a model out (the names follow the checkpoint: `wte`, `wpe`,
`h`, `c_attn`, `ln_f`), with the details that make such a file awkward to check and that the harness
handles for it: `nn.Linear` where the checkpoint stores `Conv1D` (in, out) weights, one fused q/k/v
projection, a causal-mask buffer the checkpoint does not have, and `forward(idx, targets=None)` that
returns `(logits, loss)` and, without targets, only the last position's logits.

`build_buggy` plants one bug: attention without the causal mask, so every position sees the future.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length: number of learned positions
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    causal: bool = True  # False is the planted bug of build_buggy


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd, self.causal = config.n_head, config.n_embd, config.causal
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        mask = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size))  # not in the checkpoint

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        if self.causal:
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied head

    def forward(self, idx, targets=None):
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:  # inference: only the last position is needed to sample the next token
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss


def build(hf_config):
    """The factory the harness calls with the reference's transformers GPT2Config."""
    c = hf_config
    return GPT(GPTConfig(c.n_positions, c.vocab_size, c.n_layer, c.n_head, c.n_embd))


def build_buggy(hf_config):
    """The same model with the planted bug: no causal mask."""
    c = hf_config
    return GPT(GPTConfig(c.n_positions, c.vocab_size, c.n_layer, c.n_head, c.n_embd, causal=False))
