"""The aligned sites of one model: discovery by naming and structure, hooks, and calling the model.

No reproduction is imported: the aligned boundaries are found by naming and structure (`discover`),
the same way for our reproductions, transformers' classes and a user's file.

Sites, in forward order (docs/diagnose.md):
  embed       the input of the first block (token + position embeddings; Llama: token embeddings;
              BERT: the embedding LayerNorm's output)
  attn, mlp   each block's attention and MLP outputs (BERT: the `attention` and `output` modules,
              which include their post-LN residual)
  block       each block's output
  final_norm  the input of the LM head (what the final norm produced)
  logits      the model's logits (BERT: the last hidden state against the word embeddings)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

ATOL = 1e-5  # fp32, as parity's logits
SITES = ("embed", "attn", "mlp", "block", "final_norm", "logits")
ATTN_NAMES = ("attn", "attention", "att")  # child names of a block, matched as substrings
MLP_NAMES = ("mlp", "ffn", "feed_forward", "feedforward", "ff")
EMBED_NAMES = ("wte", "wpe", "tok_emb", "pos_emb", "embed_tokens", "word_embeddings", "position_embeddings",
               "token_type_embeddings", "embed", "tokens_embed", "positions_embed")


# ---- layout: the aligned boundaries of one module ---------------------------------------------------


@dataclass
class Layout:
    """Module names (as `named_modules` gives them) of each aligned boundary of one model."""

    blocks: str  # the ModuleList of blocks
    n_layer: int
    attn: list[str | None]
    mlp: list[str | None]
    embeds: list[str]
    final_norm: str | None
    head: str | None  # the LM head Linear, if the model has one
    norms: list[str] = field(default_factory=list)  # every norm module, in registration order

    def module_name(self, site: str, block: int | None) -> str:
        if site == "embed":
            return " + ".join(self.embeds) or f"input of {self.blocks}.0"
        if site == "attn":
            return self.attn[block] or "-"
        if site == "mlp":
            return self.mlp[block] or "-"
        if site == "block":
            return f"{self.blocks}.{block}"
        if site == "final_norm":
            return self.final_norm or (f"input of {self.head}" if self.head else "-")
        return self.head or "logits"

    def sites(self) -> list[tuple[str, int | None]]:
        out: list[tuple[str, int | None]] = [("embed", None)]
        for i in range(self.n_layer):
            out += [("attn", i)] if self.attn[i] else []
            out += [("mlp", i)] if self.mlp[i] else []
            out.append(("block", i))
        if self.head is not None:
            out.append(("final_norm", None))
        return out + [("logits", None)]


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def discover(module: nn.Module) -> Layout:
    """Find the blocks (the longest ModuleList/Sequential of one class), their attention / MLP children by name,
    the embeddings before them, the final norm and LM head after them."""
    named = list(module.named_modules())
    lists = [(n, m) for n, m in named if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0
             and len({type(c) for c in m}) == 1 and not isinstance(m[0], (nn.Linear, nn.Embedding))]
    if not lists:
        raise ValueError(f"{type(module).__name__} has no nn.ModuleList (or nn.Sequential) of blocks; diagnose "
                         "needs one (e.g. self.h = nn.ModuleList(Block(...) for _ in range(n_layer)))")
    blocks_name, blocks = max(lists, key=lambda item: len(item[1]))
    prefix = blocks_name + "."
    order = [n for n, _ in named]
    start = order.index(blocks_name)
    end = max(i for i, n in enumerate(order) if n == blocks_name or n.startswith(prefix))
    attn = [_child(f"{prefix}{i}", b, ATTN_NAMES) for i, b in enumerate(blocks)]
    mlp = [_child(f"{prefix}{i}", b, MLP_NAMES) or _bert_output(f"{prefix}{i}", b) for i, b in enumerate(blocks)]
    embeds = [n for n, m in named[:start] if isinstance(m, nn.Embedding)]
    after = named[end + 1:]
    norms_after = [n for n, m in after if _is_norm(m)]
    heads = [n for n, m in after if isinstance(m, nn.Linear) and _vocab(module) in (None, m.out_features)]
    return Layout(blocks_name, len(blocks), attn, mlp, embeds, norms_after[0] if norms_after else None,
                  heads[-1] if heads else None, [n for n, m in named if _is_norm(m)])


def _child(prefix: str, block: nn.Module, names: tuple[str, ...]) -> str | None:
    for name, child in block.named_children():
        if any(k in name.lower() for k in names) and not _is_norm(child):
            return f"{prefix}.{name}"
    return None


def _bert_output(prefix: str, block: nn.Module) -> str | None:
    """BERT's feed-forward is `intermediate` then `output` (which adds the residual and normalises)."""
    children = dict(block.named_children())
    return f"{prefix}.output" if "intermediate" in children and "output" in children else None


def _vocab(module: nn.Module) -> int | None:
    cfg = getattr(module, "config", None)
    return getattr(cfg, "vocab_size", None)


# ---- running a model with hooks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor | None = None  # (B, T), BERT only: row 0 ends in padding
    token_type_ids: Tensor | None = None  # (B, T), BERT only: the second half is segment 1
    position_ids: Tensor | None = None  # reference counterfactuals only


def make_batch(vocab_size: int, seq_len: int, seed: int, bidirectional: bool) -> Batch:
    """Two seeded rows of token ids; for an encoder, a padded row and two segments."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, seq_len), generator=g)
    if not bidirectional:
        return Batch(ids)
    mask = torch.ones_like(ids)
    mask[0, seq_len - max(1, seq_len // 4):] = 0
    types = torch.zeros_like(ids)
    types[:, seq_len // 2:] = 1
    return Batch(ids, mask, types)


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    for attr in ("logits", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    raise TypeError(f"cannot read a tensor from a {type(out).__name__}")


def _is_hf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.") or any(
        c.__module__.startswith("transformers.") for c in type(module).__mro__[1:-1])


def call_model(module: nn.Module, batch: Batch, bidirectional: bool) -> Tensor:
    """Logits (B, T, V): transformers models by keyword, others positionally
    (`forward(input_ids)`, encoders `forward(input_ids, attention_mask, token_type_ids)`)."""
    if _is_hf(module):
        kw: dict[str, Any] = {"input_ids": batch.input_ids}
        if bidirectional:
            kw.update(attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids)
        else:
            kw["use_cache"] = False
        if batch.position_ids is not None:
            kw["position_ids"] = batch.position_ids
        out = module(**kw)
    elif bidirectional:
        out = module(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    else:
        out = module(batch.input_ids)
    if getattr(out, "logits", None) is None and getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state @ _word_embeddings(module).weight.T  # tied MLM decoder, no transform
    logits = _first_tensor(out)
    if logits.dim() == 3 and logits.size(1) == 1 and batch.input_ids.size(1) > 1:
        raise ValueError("forward(input_ids) returned logits for the last position only; return every "
                         "position's logits when called without targets (e.g. drop nanoGPT's `x[:, [-1], :]`)")
    return logits


def _word_embeddings(module: nn.Module) -> nn.Embedding:
    embs = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Embedding)]
    for n, m in embs:
        if any(k in n for k in ("word", "tok", "wte", "embed_tokens")):
            return m
    return embs[0][1]


@dataclass
class Trace:
    acts: dict[tuple[str, int | None], Tensor]  # site -> activation (B, T, C), detached
    calls: dict[str, tuple[tuple, dict]]  # module name -> (args, kwargs) of its call
    outputs: dict[str, Tensor]  # module name -> first tensor output
    logits: Tensor  # with the graph, for the backward


Call = Callable[[nn.Module, Batch], Tensor]  # (module, batch) -> logits (B, T, V)


def trace(module: nn.Module, layout: Layout, batch: Batch, bidirectional: bool, grad: bool = False,
          call: Call | None = None) -> Trace:
    """One forward with hooks at every site; also keeps each attention/MLP/block call's arguments.
    `call` computes the logits (default `call_model`; e.g. a user adapter's forward)."""
    mods = dict(module.named_modules())
    acts: dict[tuple[str, int | None], Tensor] = {}
    calls: dict[str, tuple[tuple, dict]] = {}
    outputs: dict[str, Tensor] = {}
    handles = []

    def keep_call(name):
        def hook(_m, args, kwargs):
            calls.setdefault(name, (args, kwargs))
        return hook

    def keep_out(name, key):
        def hook(_m, _args, out):
            t = _first_tensor(out).detach()
            outputs.setdefault(name, t)
            if key is not None:
                acts.setdefault(key, t)
        return hook

    def keep_in(key):
        def hook(_m, args, kwargs):
            acts.setdefault(key, _hidden_input(args, kwargs).detach())
        return hook

    watched: list[tuple[str, tuple[str, int | None] | None]] = []
    for i in range(layout.n_layer):
        watched += [(layout.attn[i], ("attn", i)), (layout.mlp[i], ("mlp", i)), (f"{layout.blocks}.{i}", ("block", i))]
    for name, key in watched:
        if name is None:
            continue
        handles.append(mods[name].register_forward_pre_hook(keep_call(name), with_kwargs=True))
        handles.append(mods[name].register_forward_hook(keep_out(name, key)))
    handles.append(mods[f"{layout.blocks}.0"].register_forward_pre_hook(keep_in(("embed", None)), with_kwargs=True))
    if layout.head is not None:
        handles.append(mods[layout.head].register_forward_pre_hook(keep_in(("final_norm", None)), with_kwargs=True))
    try:
        with torch.set_grad_enabled(grad):
            logits = call(module, batch) if call is not None else call_model(module, batch, bidirectional)
    finally:
        for h in handles:
            h.remove()
    acts[("logits", None)] = logits.detach()
    return Trace(acts, calls, outputs, logits)


def _hidden_input(args: tuple, kwargs: dict) -> Tensor:
    for value in (*args, kwargs.get("hidden_states"), kwargs.get("x"), *kwargs.values()):
        if isinstance(value, Tensor) and value.is_floating_point():
            return value
    raise ValueError("a block was called without a floating-point hidden state")


def _float3d(args: tuple, kwargs: dict) -> list[tuple[str | int, Tensor]]:
    items = list(enumerate(args)) + list(kwargs.items())
    return [(k, v) for k, v in items if isinstance(v, Tensor) and v.is_floating_point() and v.dim() == 3]


def rerun_with(module: nn.Module, call: tuple[tuple, dict], other: tuple[tuple, dict]) -> Tensor | None:
    """Call `module` with its own captured arguments, its hidden-state inputs replaced by `other`'s
    (the reference module's), in order; None when the inputs cannot be paired."""
    args, kwargs = list(call[0]), dict(call[1])
    mine, theirs = _float3d(*call), _float3d(*other)
    if not mine or not theirs:
        return None
    pairs = list(zip(mine, theirs)) if len(mine) == len(theirs) else [(mine[0], theirs[0])]
    for (key, old), (_, new) in pairs:
        if old.shape != new.shape:
            return None
        if isinstance(key, int):
            args[key] = new
        else:
            kwargs[key] = new
    with torch.no_grad():
        return _first_tensor(module(*args, **kwargs)).detach()
