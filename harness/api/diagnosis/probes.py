"""Targeted probes at the first divergent site: what the difference looks like and where it comes from.

Run at the first divergent site only: the whole model at T = 1; a position profile (does position 0
agree, the last one, does the difference grow); future leakage (does changing the last token change
earlier positions of ours); the site's module alone fed the reference's input; captured inputs
compared (does our attention read the raw residual stream, does our block drop a residual); and a
structural look (norm eps, head tying). Counterfactuals are in `counterfactuals.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from harness.api.diagnosis.compare import _diff
from harness.api.diagnosis.sites import (
    Batch,
    Call,
    Layout,
    Trace,
    _float3d,
    _word_embeddings,
    rerun_with,
    trace,
)


@dataclass
class Evidence:
    """What the probes saw at the first divergent site (docs/diagnose.md: the catalogue)."""

    site: str
    block: int | None
    rel_diff: float
    t1_diverges: bool | None = None
    pos0_ok: bool | None = None
    last_ok: bool | None = None
    grows: bool | None = None
    leaks: bool | None = None
    isolated_diverges: bool | None = None
    padded_rows_only: bool | None = None
    reads_raw_stream: bool | None = None
    residual_dropped: bool | None = None
    eps_mismatch: str | None = None
    head_untied: bool | None = None
    gqa: bool = False
    rope: bool = False
    counterfactuals: dict[str, float] = field(default_factory=dict)  # key -> diff after / diff before
    counterfactual_notes: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    ours: nn.Module
    ref: nn.Module
    layout: Layout
    ref_layout: Layout
    batch: Batch
    bidirectional: bool
    trace_ours: Trace
    trace_ref: Trace
    call_ours: Call | None = None

    def diff_at(self, ref_trace: Trace, key: tuple[str, int | None], ours: Trace | None = None) -> float:
        mine = (ours or self.trace_ours).acts.get(key)
        return math.inf if mine is None else _diff(mine, ref_trace.acts[key])[0]


def _per_position(a: Tensor, b: Tensor) -> Tensor:
    return (a.float() - b.float()).abs().amax(dim=(0, 2))  # (T,)


def _position_probes(ev: Evidence, ctx: Context, key, tol: float) -> None:
    mine, theirs = ctx.trace_ours.acts[key], ctx.trace_ref.acts[key]
    if mine.shape != theirs.shape or mine.dim() != 3:
        return
    prof = _per_position(mine, theirs)
    ev.pos0_ok = bool(prof[0] <= tol)
    ev.last_ok = bool(prof[-1] <= tol)
    half = len(prof) // 2
    ev.grows = bool(prof[half:].mean() > 2 * prof[:half].mean() + tol)
    if ctx.batch.attention_mask is not None:
        rows = (mine.float() - theirs.float()).abs().amax(dim=(1, 2))  # (B,)
        padded = (ctx.batch.attention_mask == 0).any(dim=1)
        ev.padded_rows_only = bool(rows[padded].max() > tol and rows[~padded].max() <= tol)


def _t1_probe(ev: Evidence, ctx: Context, key, tol: float) -> None:
    b = ctx.batch
    one = Batch(b.input_ids[:, :1], None if b.attention_mask is None else torch.ones_like(b.input_ids[:, :1]),
                None if b.token_type_ids is None else b.token_type_ids[:, :1])
    mine = trace(ctx.ours, ctx.layout, one, ctx.bidirectional, call=ctx.call_ours)
    theirs = trace(ctx.ref, ctx.ref_layout, one, ctx.bidirectional)
    if key in mine.acts and key in theirs.acts:
        ev.t1_diverges = _diff(mine.acts[key], theirs.acts[key])[0] > tol


def _leak_probe(ev: Evidence, ctx: Context, key, tol: float) -> None:
    """Causal models only: change the last token; do earlier positions of ours move?"""
    if ctx.bidirectional:
        return
    ids = ctx.batch.input_ids.clone()
    ids[:, -1] = (ids[:, -1] + 1) % max(int(ids.max()) + 2, 2)
    moved = trace(ctx.ours, ctx.layout, Batch(ids), ctx.bidirectional, call=ctx.call_ours)
    if key in moved.acts:
        ev.leaks = _diff(moved.acts[key][:, :-1], ctx.trace_ours.acts[key][:, :-1])[0] > tol


def _isolation_probe(ev: Evidence, ctx: Context, tol: float) -> None:
    """Our site module alone, fed the reference module's inputs."""
    name = _site_module(ctx.layout, ev.site, ev.block)
    ref_name = _site_module(ctx.ref_layout, ev.site, ev.block)
    if name is None or ref_name is None or name not in ctx.trace_ours.calls or ref_name not in ctx.trace_ref.calls:
        return
    out = rerun_with(dict(ctx.ours.named_modules())[name], ctx.trace_ours.calls[name], ctx.trace_ref.calls[ref_name])
    if out is not None:
        ev.isolated_diverges = _diff(out, ctx.trace_ref.outputs[ref_name])[0] > tol


def _site_module(layout: Layout, site: str, block: int | None) -> str | None:
    if site == "attn":
        return layout.attn[block]
    if site == "mlp":
        return layout.mlp[block]
    if site == "block":
        return f"{layout.blocks}.{block}"
    return None


def _close(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    return _diff(a, b)[0] <= 1e-4 * max(1.0, b.abs().max().item())


def _wiring_probes(ev: Evidence, ctx: Context) -> None:
    """Compare captured tensors across roles: raw stream into attention (post-LN), a missing residual."""
    i = ev.block
    if i is None:
        return
    lo, lr, to, tr = ctx.layout, ctx.ref_layout, ctx.trace_ours, ctx.trace_ref
    block_in_ref = _input_of(tr, f"{lr.blocks}.{i}")
    if ev.site == "attn" and lo.attn[i] and not ctx.bidirectional:
        ev.reads_raw_stream = _close(_input_of(to, lo.attn[i]), block_in_ref)
    if ev.site in ("mlp", "block") and lo.mlp[i] and lr.attn[i] and lr.mlp[i]:
        attn_only = tr.outputs.get(lr.attn[i])
        mlp_only = tr.outputs.get(lr.mlp[i])
        dropped_attn = ev.site == "mlp" and _close(_input_of(to, lo.mlp[i]), _norm_of(ctx, attn_only, i))
        dropped_mlp = ev.site == "block" and _close(to.acts.get(("block", i)), mlp_only)
        ev.residual_dropped = dropped_attn or dropped_mlp


def _input_of(tr: Trace, name: str | None) -> Tensor | None:
    if name is None or name not in tr.calls:
        return None
    found = _float3d(*tr.calls[name])
    return found[0][1] if found else None


def _norm_of(ctx: Context, x: Tensor | None, block: int) -> Tensor | None:
    """The reference's pre-MLP norm applied to x (what our MLP reads if the attention residual is gone)."""
    if x is None:
        return None
    mods = dict(ctx.ref.named_modules())
    norms = [n for n in ctx.ref_layout.norms if n.startswith(f"{ctx.ref_layout.blocks}.{block}.")]
    if len(norms) < 2:
        return None
    with torch.no_grad():
        return mods[norms[1]](x)


def _eps(module: nn.Module) -> float | None:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return None


def _structure_probes(ev: Evidence, ctx: Context) -> None:
    mo, mr = dict(ctx.ours.named_modules()), dict(ctx.ref.named_modules())
    pairs = list(zip(ctx.layout.norms, ctx.ref_layout.norms))
    bad = [(a, _eps(mo[a]), _eps(mr[b])) for a, b in pairs if None not in (_eps(mo[a]), _eps(mr[b]))
           and not math.isclose(_eps(mo[a]), _eps(mr[b]), rel_tol=1e-6)]
    if bad:
        name, mine, theirs = bad[0]
        ev.eps_mismatch = f"{name}.eps = {mine:g}, the reference's {theirs:g} ({len(bad)} norm(s) differ)"
    head_o, head_r = ctx.layout.head, ctx.ref_layout.head
    if head_o and head_r:
        tied_ref = mr[head_r].weight is _word_embeddings(ctx.ref).weight
        tied_ours = mo[head_o].weight is _word_embeddings(ctx.ours).weight
        ev.head_untied = tied_ref and not tied_ours
    cfg = getattr(ctx.ref, "config", None)
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    ev.gqa = bool(heads and kv and kv < heads)
    ev.rope = any("rotary" in n for n in mr)
