"""Task `mutants`: plant known reproduction bugs in our own models; does `harness diagnose` find them?

Each mutant is one classic bug of a from-scratch reproduction, applied at run time to a copy of the
harness's own `gpt2-scratch`, `llama-scratch` or `bert-scratch` module (instance `forward`s replaced
or attributes changed; reproductions/*.py are never edited). The copy is held against the unmutated
reference (`gpt2-hf`, ...) on identical weights by the diagnosis of harness/api/diagnosis/, the
same code as `harness diagnose`. Per mutant:

  caught      the diagnosis reports a divergence (parity fails);
  localised   its first divergent site and block are the ones the bug lives in;
  diagnosed   the bug's cause is among the top two suspects.

Metrics: `caught`, `localised`, `diagnosed` (0/1, subtask = the mutant's name) and, over the
mutants of the model's family, `caught_rate`, `localised_rate`, `diagnosed_rate` (targets 100%,
>= 95%, >= 80%). A clean copy is checked first (`clean_diverged`, must be 0): a diagnosis that
flags the unmutated model would make every "caught" meaningless.

The task runs the mutants of the family of each `--model` it is given (gpt2, llama, bert):

    harness run --model gpt2-scratch,llama-scratch,bert-scratch --tasks mutants --results-dir results/mutants

Weights are the architecture's default (`--weights` applies to all): GPT-2's trained tiny checkpoint
(harness/assets/gpt2-default), random tiny Llama, MiniLM-L6 for BERT. Random checkpoints have every
norm weight 1 and bias 0, which hides any bug that drops them, so before the diagnosis the norm
weights and biases of both models get the same seeded jitter (`norm_jitter`): scratch and
reference still hold identical tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from harness.api import MODELS, TASKS, Capability, HarnessError, Metric, MetricSpec, ModelAdapter, RunContext, Task
from harness.api.diagnosis import diagnose


@dataclass(frozen=True)
class Mutant:
    name: str
    family: str  # gpt2 | llama | bert
    bug: str  # in words, for the report
    site: str  # where the bug first shows, in forward order
    block: int | None  # -1: the last block
    cause: str  # key of the diagnosis catalogue (harness.api.diagnosis.CATALOGUE)
    apply: Callable[[nn.Module], None]  # mutate the (copied) scratch module in place


def _patch(module: nn.Module, fn: Callable, **kwargs) -> None:
    """Replace one module instance's forward by `fn(self, *args, **kwargs)`."""
    module.forward = types.MethodType(lambda self, *a, **k: fn(self, *a, **k, **kwargs), module)


# ---- GPT-2 (reproductions/gpt2.py) -------------------------------------------------------------------


def _gpt2_attention(self, x, mask=None, kv_cache=None, layer=0, *, scale=None, causal=True, axis=-1):
    """CausalSelfAttention.forward written out (no cache), with the knobs a bug turns."""
    B, T, C = x.shape
    q, k, v = self.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    att = (q @ k.transpose(-2, -1)) * (scale if scale is not None else (C // self.n_head) ** -0.5)
    if causal:
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = F.softmax(att, dim=axis) @ v  # (B, nh, T, hs)
    return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


def _gpt2_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.transformer.h)


def _gpt2_attn_bug(**kwargs) -> Callable[[nn.Module], None]:
    def apply(model: nn.Module) -> None:
        for block in _gpt2_blocks(model):
            _patch(block.attn, _gpt2_attention, **kwargs)
    return apply


def _gpt2_scale_by_width(model: nn.Module) -> None:
    for block in _gpt2_blocks(model):
        _patch(block.attn, _gpt2_attention, scale=model.config.n_embd ** -0.5)


def _gpt2_gelu_exact(model: nn.Module) -> None:
    for block in _gpt2_blocks(model):
        _patch(block.mlp, lambda self, x: self.c_proj(F.gelu(self.c_fc(x))))


def _gpt2_positions_from_one(model: nn.Module) -> None:
    def hidden_states(self, idx, kv_cache=None, attention_mask=None):
        pos = torch.arange(1, idx.size(1) + 1, device=idx.device)  # the bug: should start at 0
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None, None, i)
        return self.transformer.ln_f(x)
    model.hidden_states = types.MethodType(hidden_states, model)


def _gpt2_no_final_norm(model: nn.Module) -> None:
    _patch(model.transformer.ln_f, lambda self, x: x)


def _gpt2_residual_dropped(model: nn.Module) -> None:
    def forward(self, x, mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), mask, kv_cache, layer)
        return self.mlp(self.ln_2(x))  # the bug: x + self.mlp(...)
    _patch(_gpt2_blocks(model)[-1], forward)


def _gpt2_layernorm_eps(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-12  # BERT's epsilon in GPT-2 (1e-5)


def _gpt2_post_ln(model: nn.Module) -> None:
    def forward(self, x, mask=None, kv_cache=None, layer=0):
        x = self.ln_1(x + self.attn(x, mask, kv_cache, layer))  # GPT-1 / BERT order
        return self.ln_2(x + self.mlp(x))
    for block in _gpt2_blocks(model):
        _patch(block, forward)


def _gpt2_untied_head(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1234)
    w = model.lm_head.weight
    model.lm_head.weight = nn.Parameter(torch.randn(w.shape, generator=g) * 0.02)  # never loaded from wte


# ---- Llama (reproductions/llama.py) -----------------------------------------------------------------


def _rope(x, cos, sin, interleaved: bool):
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    half = x.size(-1) // 2
    c = cos[..., :half].repeat_interleave(2, dim=-1)  # pair (2i, 2i+1) rotates by theta_i
    s = sin[..., :half].repeat_interleave(2, dim=-1)
    rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * c + rotated * s


def _llama_attention(self, x, cos, sin, kv_cache=None, *, interleaved=False, tile=False, causal=True, scale=None):
    """Attention.forward written out (no cache), with the knobs a bug turns."""
    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
    k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
    v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
    q, k = _rope(q, cos, sin, interleaved), _rope(k, cos, sin, interleaved)
    groups = self.n_head // self.n_kv_head
    if tile:  # the bug: head h reads kv head h % n_kv instead of h // groups
        k, v = k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)
    else:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = torch.ones(T, T, dtype=torch.bool).tril() if causal else None
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, nh, T, hs)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def _llama_attn_bug(**kwargs) -> Callable[[nn.Module], None]:
    def apply(model: nn.Module) -> None:
        for block in model.model.layers:
            extra = dict(kwargs)
            if extra.pop("scale_by_head_dim", False):
                extra["scale"] = 1.0 / block.self_attn.head_dim
            _patch(block.self_attn, _llama_attention, **extra)
    return apply


def _llama_rmsnorm_no_weight(model: nn.Module) -> None:
    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)  # no * self.weight
    for m in model.modules():
        if type(m).__name__ == "RMSNorm":
            _patch(m, forward)


# ---- BERT (reproductions/bert.py) -------------------------------------------------------------------


def _bert_no_token_types(model: nn.Module) -> None:
    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # the bug: no token types
        return self.dropout(self.LayerNorm(x))
    _patch(model.embeddings, forward)


def _bert_no_padding_mask(model: nn.Module) -> None:
    original = model.encoder.forward
    model.encoder.forward = lambda x, key_mask: original(x, None)


def _bert_gelu_tanh(model: nn.Module) -> None:
    for layer in model.encoder.layer:
        _patch(layer.intermediate, lambda self, x: F.gelu(self.dense(x), approximate="tanh"))


def _bert_layernorm_eps(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-5  # GPT-2's epsilon in BERT (1e-12)


def _bert_attention(self, x, key_mask, *, scale=None):
    B, T, H = x.shape
    split = lambda t: t.view(B, T, self.n_head, H // self.n_head).transpose(1, 2)  # noqa: E731
    y = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                       attn_mask=key_mask, scale=scale)
    return y.transpose(1, 2).reshape(B, T, H)


def _bert_no_attention_scale(model: nn.Module) -> None:
    for layer in model.encoder.layer:
        _patch(layer.attention.self, _bert_attention, scale=1.0)


MUTANTS: tuple[Mutant, ...] = (
    Mutant("gpt2-gelu-exact", "gpt2", "exact (erf) GELU instead of tanh 'gelu_new'", "mlp", 0, "gelu",
           _gpt2_gelu_exact),
    Mutant("gpt2-no-causal-mask", "gpt2", "attention without the causal mask", "attn", 0, "causal_mask",
           _gpt2_attn_bug(causal=False)),
    Mutant("gpt2-scale-by-width", "gpt2", "scores scaled by 1/sqrt(n_embd), not 1/sqrt(head size)", "attn", 0,
           "softmax_scale", _gpt2_scale_by_width),
    Mutant("gpt2-softmax-wrong-axis", "gpt2", "softmax over the query axis (dim=-2)", "attn", 0, "softmax_axis",
           _gpt2_attn_bug(axis=-2)),
    Mutant("gpt2-positions-off-by-one", "gpt2", "position ids start at 1", "embed", None, "position_ids",
           _gpt2_positions_from_one),
    Mutant("gpt2-no-final-norm", "gpt2", "ln_f skipped", "final_norm", None, "final_norm", _gpt2_no_final_norm),
    Mutant("gpt2-residual-dropped", "gpt2", "last block returns mlp(ln_2(x)) without + x", "block", -1,
           "residual", _gpt2_residual_dropped),
    Mutant("gpt2-layernorm-eps", "gpt2", "LayerNorm eps 1e-12 instead of 1e-5", "attn", 0, "norm_eps",
           _gpt2_layernorm_eps),
    Mutant("gpt2-post-ln", "gpt2", "post-LN blocks: ln(x + f(x)) instead of x + f(ln(x))", "attn", 0,
           "norm_placement", _gpt2_post_ln),
    Mutant("gpt2-untied-head", "gpt2", "lm_head not tied to wte (its own random weights)", "logits", None,
           "head_tying", _gpt2_untied_head),
    Mutant("llama-rope-interleaved", "llama", "RoPE on adjacent pairs instead of halves", "attn", 0,
           "rope_pairing", _llama_attn_bug(interleaved=True)),
    Mutant("llama-gqa-tiled", "llama", "key/value heads tiled (repeat) instead of repeat_interleave", "attn", 0,
           "gqa_repeat", _llama_attn_bug(tile=True)),
    Mutant("llama-rmsnorm-no-weight", "llama", "RMSNorm without its weight", "attn", 0, "rmsnorm_weight",
           _llama_rmsnorm_no_weight),
    Mutant("llama-no-causal-mask", "llama", "attention without the causal mask", "attn", 0, "causal_mask",
           _llama_attn_bug(causal=False)),
    Mutant("llama-scale-by-head-dim", "llama", "scores scaled by 1/head size, not 1/sqrt(head size)", "attn", 0,
           "softmax_scale", _llama_attn_bug(scale_by_head_dim=True)),
    Mutant("bert-token-types-ignored", "bert", "segment embeddings not added", "embed", None, "token_types",
           _bert_no_token_types),
    Mutant("bert-padding-mask-ignored", "bert", "attention mask not passed to the encoder", "attn", 0,
           "padding_mask", _bert_no_padding_mask),
    Mutant("bert-gelu-tanh", "bert", "tanh-approximate GELU instead of the exact one", "mlp", 0, "gelu",
           _bert_gelu_tanh),
    Mutant("bert-layernorm-eps", "bert", "LayerNorm eps 1e-5 instead of 1e-12", "embed", None, "norm_eps",
           _bert_layernorm_eps),
    Mutant("bert-no-attention-scale", "bert", "attention scores not divided by sqrt(head size)", "attn", 0,
           "softmax_scale", _bert_no_attention_scale),
)
FAMILIES = tuple(dict.fromkeys(m.family for m in MUTANTS))


@dataclass(frozen=True)
class MutantsConfig:
    seq_len: int = 16  # tokens per sequence of the diagnosis batch
    norm_jitter: float = 0.2  # norm weights x (1 + jitter N(0, 1)), biases + jitter N(0, 1) / 10; 0: off
    mutants: tuple[str, ...] = ()  # only these (names); empty: every mutant of the model's family


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    caught: bool
    localised: bool
    diagnosed: bool
    first: str  # "site[block]" or "-"
    top: tuple[str, ...]  # suspect keys, best first
    expected: str  # "site[block]", the last block resolved

    def extra(self) -> dict:
        m = self.mutant
        return {"family": m.family, "bug": m.bug, "expected": self.expected, "first": self.first,
                "cause": m.cause, "top_suspects": list(self.top[:3])}


def _where(site: str, block: int | None) -> str:
    return site if block is None else f"{site}[{block}]"


def jitter_norms(state_dict: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Seeded jitter of every norm weight/bias (keys with 'norm', 'ln_' or 'LayerNorm'), same on both sides."""
    if scale <= 0:
        return dict(state_dict)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in state_dict.items():
        is_norm = any(k in key for k in ("norm", "ln_", "LayerNorm")) and t.is_floating_point()
        if is_norm and key.endswith("weight"):
            t = t * (1 + scale * torch.randn(t.shape, generator=g))
        elif is_norm and key.endswith("bias"):
            t = t + scale / 10 * torch.randn(t.shape, generator=g)
        out[key] = t
    return out


def evaluate(mutant: Mutant, scratch: nn.Module, reference: nn.Module, vocab: int, seq_len: int, seed: int,
             n_layer: int) -> Outcome:
    ours = copy.deepcopy(scratch)
    mutant.apply(ours)
    d = diagnose(ours, reference, mutant.family, vocab, seq_len, seed)
    block = n_layer - 1 if mutant.block == -1 else mutant.block
    first = "-" if d.first is None else _where(d.first.site, d.first.block)
    top = tuple(s.key for s in d.suspects)
    localised = d.first is not None and (d.first.site, d.first.block) == (mutant.site, block)
    return Outcome(mutant, d.diverged, localised, mutant.cause in top[:2], first, top, _where(mutant.site, block))


class Mutants(Task):
    name = "mutants"
    version = "1.0"
    description = "known bugs planted in our gpt2/llama/bert: caught, localised and diagnosed by harness diagnose"
    config_class = MutantsConfig
    needs = frozenset({Capability.LOGITS})
    metrics = {
        "caught_rate": MetricSpec(higher_is_better=True, threshold=None, gate_atol=0.0),
        "localised_rate": MetricSpec(higher_is_better=True, threshold=None, gate_atol=0.0),
        "diagnosed_rate": MetricSpec(higher_is_better=True, threshold=None, gate_atol=0.0),
        "caught": MetricSpec(higher_is_better=True),
        "localised": MetricSpec(higher_is_better=True),
        "diagnosed": MetricSpec(higher_is_better=True),
        "clean_diverged": MetricSpec(higher_is_better=False),
    }

    def validate(self) -> None:
        known = {m.name for m in MUTANTS}
        unknown = [n for n in self.config.mutants if n not in known]
        if unknown:
            raise HarnessError(f"mutants.mutants: unknown mutant(s) {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(known))}")
        if not 2 <= self.config.seq_len <= 64:
            raise HarnessError(f"mutants.seq_len {self.config.seq_len}: must be in 2..64 (T > 1 for the probes)")

    def selected(self, family: str) -> list[Mutant]:
        return [m for m in MUTANTS if m.family == family and (not self.config.mutants or m.name in self.config.mutants)]

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        family = model.info.arch
        if model.info.impl != "scratch" or family not in FAMILIES or model.info.reference is None:
            raise HarnessError(f"mutants plants bugs in our own reproductions: give --model "
                               f"{','.join(f + '-scratch' for f in FAMILIES)} (got '{model.name}')")
        scratch, reference = self.pair(model, ctx.seed)
        vocab = model.weights.hf_config.vocab_size
        n_layer = len(_blocks_of(scratch))
        clean = diagnose(scratch, reference, family, vocab, self.config.seq_len, ctx.seed)
        yield self.metric("clean_diverged", float(clean.diverged), n=1,
                          extra={"first": "-" if clean.first is None else _where(clean.first.site, clean.first.block)})
        outcomes = []
        for mutant in ctx.track(self.selected(family), description=f"mutants ({family})"):
            o = evaluate(mutant, scratch, reference, vocab, self.config.seq_len, ctx.seed, n_layer)
            outcomes.append(o)
            for metric in ("caught", "localised", "diagnosed"):
                yield self.metric(metric, float(getattr(o, metric)), subtask=mutant.name, n=1, extra=o.extra())
        if outcomes:
            for metric in ("caught", "localised", "diagnosed"):
                rate = sum(getattr(o, metric) for o in outcomes) / len(outcomes)
                yield self.metric(f"{metric}_rate", rate, n=len(outcomes), extra={"family": family})

    def pair(self, model: ModelAdapter, seed: int) -> tuple[nn.Module, nn.Module]:
        """Scratch and reference modules on the model's weights with jittered norms (identical on both)."""
        w = model.weights
        weights = dataclasses.replace(w, state_dict=jitter_norms(w.state_dict, self.config.norm_jitter, seed))
        torch.manual_seed(seed)
        scratch = MODELS.get(model.name).build(weights, "cpu").module.float().eval()
        reference = MODELS.get(model.info.reference).build(weights, "cpu").module.float().eval()
        return scratch, reference

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        return mutants_table(history)


def _blocks_of(module: nn.Module) -> nn.ModuleList:
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len)


def mutants_table(history: pd.DataFrame) -> str:
    """Markdown: the three rates over every mutant run, then one row per mutant."""
    from harness.api import latest

    rows = latest(history)
    rows = rows[rows["metric"].isin(["caught", "localised", "diagnosed"])]
    if rows.empty:
        return ""
    per = {}
    for _, r in rows.iterrows():
        per.setdefault(r["subtask"], {"extra": r["extra"]})[r["metric"]] = r["value"]
    n = len(per)
    rate = lambda m: sum(v.get(m, 0) for v in per.values()) / n  # noqa: E731
    lines = ["### Mutation benchmark", "",
             f"{n} mutants: caught {rate('caught'):.0%}, localised {rate('localised'):.0%}, "
             f"diagnosed {rate('diagnosed'):.0%} (targets 100%, >= 95%, >= 80%).", "",
             "| mutant | bug | expected site | first divergent site | true cause | top suspects | caught | "
             "localised | diagnosed |", "|---|---|---|---|---|---|---|---|---|"]
    mark = lambda v: "yes" if v == 1.0 else "**no**"  # noqa: E731
    for name in sorted(per, key=lambda s: [m.name for m in MUTANTS].index(s) if s in {m.name for m in MUTANTS}
                       else math.inf):
        v, e = per[name], per[name]["extra"] if isinstance(per[name]["extra"], dict) else {}
        lines.append(f"| {name} | {e.get('bug', '')} | {e.get('expected', '')} | {e.get('first', '')} | "
                     f"{e.get('cause', '')} | {', '.join(e.get('top_suspects', []))} | {mark(v.get('caught'))} | "
                     f"{mark(v.get('localised'))} | {mark(v.get('diagnosed'))} |")
    return "\n".join(lines) + "\n"


TASKS.add(Mutants.name, Mutants.description, Mutants)
