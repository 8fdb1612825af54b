"""A user's GPT-2 in the style of "Build a Large Language Model (From Scratch)", with its own weight loader.

    harness run --model examples/raschka_gpt2.py:build --reference gpt2-hf --tasks parity --weights random:tiny
    harness run --model examples/raschka_gpt2.py:build_buggy --reference gpt2-hf --tasks parity --weights random:tiny

GPT-2 (Radford et al. 2019, Section 2.3; pre-LN blocks, final LayerNorm, learned positions, tanh-GELU),
laid out the way that book writes it: its own names (`tok_emb`, `pos_emb`, `trf_blocks`, `att`, `ff`,
`norm1`/`norm2` with `scale`/`shift`, `final_norm`, `out_head`), separate `W_query` / `W_key` /
`W_value` projections, a `mask` buffer, an untied output head and a string-keyed config dict. Its names
match no checkpoint, so the file brings `load_reference_weights(module, state_dict)`: the harness passes
the reference's tensors (transformers' GPT-2 names; `Conv1D` weights stored (in, out)) and learns where
each one went by calling it once on a fingerprint of the checkpoint.

`build_buggy` plants one bug: LayerNorm with eps 1e-6 instead of GPT-2's 1e-5.
"""

import torch
import torch.nn as nn


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, _ = x.shape
        split = lambda t: t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (b, h, T, hd)
        queries, keys, values = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
        scores = queries @ keys.transpose(2, 3)  # (b, h, T, T)
        scores = scores.masked_fill(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim**0.5, dim=-1))
        context = (weights @ values).transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    def forward(self, x):  # the tanh approximation GPT-2 was trained with
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * x**3)))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), GELU(),
                                    nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]))

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                      cfg["n_heads"], cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"], cfg["ln_eps"])
        self.norm2 = LayerNorm(cfg["emb_dim"], cfg["ln_eps"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"], cfg["ln_eps"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        _, seq_len = in_idx.shape
        pos = torch.arange(seq_len, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))
        return self.out_head(self.final_norm(self.trf_blocks(x)))  # (b, T, vocab)


def config_from_hf(hf_config, ln_eps=1e-5):
    return {"vocab_size": hf_config.vocab_size, "context_length": hf_config.n_positions,
            "emb_dim": hf_config.n_embd, "n_heads": hf_config.n_head, "n_layers": hf_config.n_layer,
            "drop_rate": hf_config.resid_pdrop, "qkv_bias": True, "ln_eps": ln_eps}


def build(hf_config):
    return GPTModel(config_from_hf(hf_config))


def build_buggy(hf_config):
    """The planted bug: LayerNorm eps 1e-6 (GPT-2: 1e-5)."""
    return GPTModel(config_from_hf(hf_config, ln_eps=1e-6))


def assign(param, value):
    if param.shape != value.shape:
        raise ValueError(f"shape mismatch: {tuple(param.shape)} vs {tuple(value.shape)}")
    param.copy_(value)


def load_reference_weights(model, sd):
    """transformers' GPT-2 tensors into GPTModel: Conv1D (in, out) weights transposed, c_attn split in three."""
    assign(model.tok_emb.weight, sd["transformer.wte.weight"])
    assign(model.pos_emb.weight, sd["transformer.wpe.weight"])
    for i, block in enumerate(model.trf_blocks):
        p = f"transformer.h.{i}."
        q, k, v = sd[p + "attn.c_attn.weight"].chunk(3, dim=-1)
        qb, kb, vb = sd[p + "attn.c_attn.bias"].chunk(3)
        for linear, w, b in ((block.att.W_query, q, qb), (block.att.W_key, k, kb), (block.att.W_value, v, vb)):
            assign(linear.weight, w.T)
            assign(linear.bias, b)
        assign(block.att.out_proj.weight, sd[p + "attn.c_proj.weight"].T)
        assign(block.att.out_proj.bias, sd[p + "attn.c_proj.bias"])
        assign(block.ff.layers[0].weight, sd[p + "mlp.c_fc.weight"].T)
        assign(block.ff.layers[0].bias, sd[p + "mlp.c_fc.bias"])
        assign(block.ff.layers[2].weight, sd[p + "mlp.c_proj.weight"].T)
        assign(block.ff.layers[2].bias, sd[p + "mlp.c_proj.bias"])
        for norm, ln in ((block.norm1, "ln_1"), (block.norm2, "ln_2")):
            assign(norm.scale, sd[p + ln + ".weight"])
            assign(norm.shift, sd[p + ln + ".bias"])
    assign(model.final_norm.scale, sd["transformer.ln_f.weight"])
    assign(model.final_norm.shift, sd["transformer.ln_f.bias"])
    assign(model.out_head.weight, sd.get("lm_head.weight", sd["transformer.wte.weight"]))
