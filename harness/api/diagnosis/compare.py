"""Comparing two traces site by site: differences, the tolerance rule, and gradients.

Tolerance, one rule for every site: a site diverges when
`max_abs_diff > ATOL * max(1, max |reference activation|)`, ATOL = 1e-5 (fp32): 1e-5 absolute on
logits of magnitude <= 1, as `parity`, and the same 1e-5 relative to the scale of larger activations.
Gradients (after one backward of the mean next-token cross-entropy) are compared per site: the
site's parameters paired in order (a transposed pair, GPT-2's Conv1D, both ways), or, when they do
not pair (fused vs separate q/k/v), as sorted values; either is a lower bound on the true difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.api.diagnosis.sites import ATOL, Batch, Layout, Trace, _word_embeddings


def tolerance(reference: Tensor) -> float:
    """The per-site rule: ATOL x max(1, max |reference|)."""
    return ATOL * max(1.0, reference.abs().max().item() if reference.numel() else 0.0)


@dataclass
class SiteDiff:
    site: str
    block: int | None
    module: str
    max_abs_diff: float
    rel_diff: float
    tolerance: float
    diverged: bool
    grad_max_abs_diff: float | None = None
    grad_diverged: bool = False

    def summary(self) -> dict[str, Any]:
        return {"site": self.site, "block": self.block, "max_abs_diff": self.max_abs_diff, "rel_diff": self.rel_diff}

    def row(self) -> dict[str, Any]:
        return {"site": self.site, "block": self.block, "module": self.module, "max_abs_diff": self.max_abs_diff,
                "rel_diff": self.rel_diff}


def _diff(a: Tensor, b: Tensor) -> tuple[float, float]:
    if a.shape != b.shape:
        return math.inf, math.inf
    d = (a.float() - b.float()).abs().max().item()
    scale = b.abs().max().item()
    return d, d / scale if scale > 0 else (0.0 if d == 0 else math.inf)


def compare(ours: Trace, ref: Trace, layout: Layout, ref_layout: Layout) -> list[SiteDiff]:
    out = []
    for key in ref_layout.sites():
        site, block = key
        if key not in ref.acts:
            continue
        theirs = ref.acts[key]
        mine = ours.acts.get(key)
        d, rel = _diff(mine, theirs) if mine is not None else (math.inf, math.inf)
        tol = tolerance(theirs)
        out.append(SiteDiff(site, block, layout.module_name(site, block), d, rel, tol, d > tol))
    return out


def _site_params(module: nn.Module, layout: Layout, site: str, block: int | None) -> list[Tensor]:
    mods = dict(module.named_modules())
    names: list[str] = []
    if site == "embed":
        names = layout.embeds
    elif site in ("attn", "mlp"):
        names = [n for n in [(layout.attn if site == "attn" else layout.mlp)[block]] if n]
    elif site == "final_norm":
        names = [layout.final_norm] if layout.final_norm else []
    elif site == "logits":
        names = [layout.head] if layout.head else []
    if site == "block":
        inner = {id(p) for n in (layout.attn[block], layout.mlp[block]) if n for p in mods[n].parameters()}
        return [p for p in mods[f"{layout.blocks}.{block}"].parameters() if id(p) not in inner]
    return [p for n in names for p in mods[n].parameters()]


def compare_grads(ours: nn.Module, ref: nn.Module, layout: Layout, ref_layout: Layout,
                  diffs: list[SiteDiff]) -> None:
    """Fill each site's gradient difference. Parameters are paired in order when their shapes agree
    (a transposed pair, GPT-2's Conv1D, compared both ways, keeping the smaller); otherwise (fused vs
    separate q/k/v) the site's sorted gradient values are compared. Both are lower bounds."""
    seen_ours: set[int] = set()
    seen_ref: set[int] = set()
    extra = _untied_copy_grads(ours, ref, layout, ref_layout, seen_ours)
    for sd in diffs:
        a = [p for p in _site_params(ours, layout, sd.site, sd.block) if id(p) not in seen_ours]
        b = [p for p in _site_params(ref, ref_layout, sd.site, sd.block) if id(p) not in seen_ref]
        seen_ours.update(id(p) for p in a)
        seen_ref.update(id(p) for p in b)
        if not b or any(p.grad is None for p in a + b):
            continue
        ga = [p.grad + extra[id(p)] if id(p) in extra else p.grad for p in a]
        d = _paired_grad_diff(ga, [p.grad for p in b])
        if d is None:
            d = _sorted_grad_diff(ga, [p.grad for p in b])
        if d is None:
            continue
        scale = max(p.grad.abs().max().item() for p in b)
        sd.grad_max_abs_diff = d
        sd.grad_diverged = d > ATOL * max(1.0, scale)


def _untied_copy_grads(ours: nn.Module, ref: nn.Module, layout: Layout, ref_layout: Layout,
                       seen: set[int]) -> dict[int, Tensor]:
    """The reference ties its head to the token embedding and ours holds two equal copies: the tied
    weight's gradient is the sum of both uses, so ours is compared as embedding grad + head grad."""
    if layout.head is None or ref_layout.head is None:
        return {}
    head_r = dict(ref.named_modules())[ref_layout.head].weight
    head_o = dict(ours.named_modules())[layout.head].weight
    emb_r, emb_o = _word_embeddings(ref).weight, _word_embeddings(ours).weight
    if head_r is not emb_r or head_o is emb_o or head_o.shape != emb_o.shape or head_o.grad is None:
        return {}
    if not torch.equal(head_o.detach(), emb_o.detach()):
        return {}  # not a copy: an untied head with its own values is a forward difference (head_tying)
    seen.add(id(head_o))
    return {id(emb_o): head_o.grad}


def _paired_grad_diff(a: list[Tensor], b: list[Tensor]) -> float | None:
    if len(a) != len(b):
        return None
    worst = 0.0
    for p, q in zip(a, b):
        gp, gq = p.float(), q.float()
        options = []
        if gp.shape == gq.shape:
            options.append((gp - gq).abs().max().item())
        if gp.dim() == 2 and gp.t().shape == gq.shape:
            options.append((gp.t() - gq).abs().max().item())
        if not options:
            return None
        worst = max(worst, min(options))
    return worst


def _sorted_grad_diff(a: list[Tensor], b: list[Tensor]) -> float | None:
    ga = torch.cat([g.detach().flatten().float() for g in a]) if a else torch.zeros(0)
    gb = torch.cat([g.detach().flatten().float() for g in b])
    if ga.numel() != gb.numel():
        return None
    return (ga.sort().values - gb.sort().values).abs().max().item()


def next_token_loss(logits: Tensor, batch: Batch) -> Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.input_ids[:, 1:].flatten())
