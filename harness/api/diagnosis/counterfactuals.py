"""Counterfactuals: the reference changed in exactly one known way, and the first site measured again.

The changes: GELU variant, softmax scale, position ids, RoPE pairing, token types, padding mask, norm
eps and weights, no final norm. A suspect that a counterfactual reproduces exactly is confirmed
(`suspects.rank`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from harness.api.diagnosis.probes import Context, Evidence, _eps
from harness.api.diagnosis.sites import Batch, _is_norm, trace

Counterfactual = Callable[[nn.Module, Context], "Batch | None"]  # change the reference in place (undone after)


def _cf_gelu(ref: nn.Module, ctx: Context) -> Batch | None:
    swapped = False
    for mod in list(ref.modules()):
        for attr, value in list(vars(mod).items()) + list(mod.named_children()):
            if isinstance(value, nn.Module) and "gelu" in type(value).__name__.lower():
                tanh = any(k in type(value).__name__.lower() for k in ("new", "tanh", "fast", "pytorchtanh"))
                setattr(mod, attr, nn.GELU(approximate="none" if tanh else "tanh"))
                swapped = True
    return ctx.batch if swapped else None


def _scales(ref: nn.Module) -> list[nn.Module]:
    return [m for m in ref.modules() if isinstance(getattr(m, "scaling", None), float)]


def _cf_scale_factor(factor: float) -> Counterfactual:
    def apply(ref: nn.Module, ctx: Context) -> Batch | None:
        mods = _scales(ref)
        for m in mods:
            m.scaling *= factor
        return ctx.batch if mods else None
    return apply


def _cf_positions(shift: int) -> Counterfactual:
    def apply(ref: nn.Module, ctx: Context) -> Batch | None:
        T = ctx.batch.input_ids.size(1)
        limit = getattr(getattr(ref, "config", None), "max_position_embeddings", None) or \
            getattr(getattr(ref, "config", None), "n_positions", None) or T + 1
        pos = torch.arange(T) + shift
        if pos.min() < 0 or pos.max() >= limit:
            return None
        b = ctx.batch
        return Batch(b.input_ids, b.attention_mask, b.token_type_ids, pos[None].expand_as(b.input_ids))
    return apply


def _cf_final_norm(ref: nn.Module, ctx: Context) -> Batch | None:
    name = ctx.ref_layout.final_norm
    if name is None:
        return None
    parent, _, attr = name.rpartition(".")
    setattr(dict(ref.named_modules())[parent] if parent else ref, attr, nn.Identity())
    return ctx.batch


def _cf_norm_eps(ref: nn.Module, ctx: Context) -> Batch | None:
    mo, mr = dict(ctx.ours.named_modules()), dict(ref.named_modules())
    changed = False
    for a, b in zip(ctx.layout.norms, ctx.ref_layout.norms):
        mine = _eps(mo[a])
        for attr in ("eps", "variance_epsilon"):
            if mine is not None and isinstance(getattr(mr[b], attr, None), float) and getattr(mr[b], attr) != mine:
                setattr(mr[b], attr, mine)
                changed = True
    return ctx.batch if changed else None


def _cf_norm_weight_ones(ref: nn.Module, ctx: Context) -> Batch | None:
    mods = [m for m in ref.modules() if _is_norm(m) and isinstance(getattr(m, "weight", None), Tensor)]
    with torch.no_grad():
        for m in mods:
            m.weight.fill_(1.0)
    return ctx.batch if mods else None


def _cf_no_token_types(ref: nn.Module, ctx: Context) -> Batch | None:
    embs = [m for n, m in ref.named_modules() if isinstance(m, nn.Embedding) and "token_type" in n]
    with torch.no_grad():
        for m in embs:
            m.weight.zero_()
    return ctx.batch if embs else None


def _cf_no_padding_mask(ref: nn.Module, ctx: Context) -> Batch | None:
    b = ctx.batch
    return None if b.attention_mask is None else Batch(b.input_ids, None, b.token_type_ids)


def _cf_rope_interleaved(ref: nn.Module, ctx: Context) -> Batch | None:
    """Adjacent-pair RoPE on weights W equals half-split RoPE on W with each head's rows reordered
    (0, 2, 4, ..., 1, 3, 5, ...): reorder the reference's q/k rows (what HF's conversion script undoes)."""
    if not any("rotary" in n for n, _ in ref.named_modules()):
        return None
    cfg = ref.config
    hs = cfg.hidden_size // cfg.num_attention_heads
    perm = torch.cat([torch.arange(0, hs, 2), torch.arange(1, hs, 2)])
    done = False
    for name, m in ref.named_modules():
        if name.endswith(("q_proj", "k_proj")) and isinstance(m, nn.Linear):
            w = m.weight.data.view(-1, hs, m.in_features)
            m.weight.data = w[:, perm].reshape(-1, m.in_features).contiguous()
            done = True
    return ctx.batch if done else None


def counterfactuals(ctx: Context, site: str) -> dict[str, Counterfactual]:
    cfg = getattr(ctx.ref, "config", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or heads
    hs = width // heads
    out: dict[str, Counterfactual] = {"norm_eps": _cf_norm_eps, "rmsnorm_weight": _cf_norm_weight_ones}
    if site == "mlp":
        out["gelu"] = _cf_gelu
    if site == "attn":
        factors = {f"x 1/sqrt({heads}) (heads)": heads ** -0.5, f"x sqrt({heads}) (heads)": heads ** 0.5,
                   f"x 1/sqrt({hs}) (head size)": hs ** -0.5, f"x sqrt({hs}) (no scaling)": hs ** 0.5,
                   f"x 1/{heads} (heads)": 1 / heads}
        for label, f in factors.items():
            out[f"softmax_scale {label}"] = _cf_scale_factor(f)
        out["rope_pairing"] = _cf_rope_interleaved
        out["padding_mask"] = _cf_no_padding_mask
    if site == "embed":
        out["position_ids +1"] = _cf_positions(1)
        out["token_types"] = _cf_no_token_types
    if site == "final_norm":
        out["final_norm"] = _cf_final_norm
    return out


@contextmanager
def _restored(module: nn.Module) -> Iterator[None]:
    """Inside, `module` may be changed in place (attributes, children, parameter values); on exit every
    module's attributes, children, parameters, buffers and parameter values are put back. Much cheaper
    than a deepcopy of a transformers model per counterfactual."""
    saved = [(m, dict(m.__dict__), dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    values = [(p, p.data.clone()) for p in module.parameters()]
    try:
        yield
    finally:
        for m, attrs, children, params, buffers in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m.__dict__.update(_modules=children, _parameters=params, _buffers=buffers)
        for p, data in values:
            p.data = data


def _run_counterfactuals(ev: Evidence, ctx: Context, key, before: float) -> None:
    for label, apply in counterfactuals(ctx, ev.site).items():
        with _restored(ctx.ref):
            batch = apply(ctx.ref, ctx)
            if batch is None:
                continue
            tr = trace(ctx.ref, ctx.ref_layout, batch, ctx.bidirectional)
        after = ctx.diff_at(tr, key)
        cause = label.split(" ")[0]
        ratio = after / before if before > 0 else 1.0
        if ratio < ev.counterfactuals.get(cause, math.inf):
            ev.counterfactuals[cause] = ratio
            ev.counterfactual_notes[cause] = label
