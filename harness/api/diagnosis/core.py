"""The whole diagnosis: trace both models, compare every site, probe the first divergence, rank suspects."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.api.diagnosis.compare import SiteDiff, compare, compare_grads, next_token_loss
from harness.api.diagnosis.counterfactuals import _run_counterfactuals
from harness.api.diagnosis.probes import (
    Context,
    Evidence,
    _isolation_probe,
    _leak_probe,
    _position_probes,
    _structure_probes,
    _t1_probe,
    _wiring_probes,
)
from harness.api.diagnosis.sites import Call, discover, make_batch, trace
from harness.api.diagnosis.suspects import CATALOGUE, Suspect, rank


@dataclass
class Diagnosis:
    diverged: bool
    first: SiteDiff | None
    sites: list[SiteDiff]
    suspects: list[Suspect]
    evidence: Evidence | None = None

    def to_json(self) -> dict[str, Any]:
        """The schema of `harness diagnose --json` (issue 12), exactly."""
        return {"diverged": self.diverged, "first": None if self.first is None else self.first.summary(),
                "sites": [s.row() for s in self.sites], "suspects": [s.text for s in self.suspects]}

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2, default=_json_float) + "\n", encoding="utf-8")
        return path


def _json_float(value: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@contextmanager
def _eval_fp32(*modules: nn.Module) -> Iterator[None]:
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def diagnose(ours: nn.Module, reference: nn.Module, family: str, vocab_size: int, seq_len: int = 16,
             seed: int = 0, bidirectional: bool | None = None, call_ours: Call | None = None) -> Diagnosis:
    """Compare `ours` with `reference` (identical weights) at every aligned site and rank suspects.
    `call_ours(module, batch)` computes our logits when `forward(input_ids)` alone does not."""
    bidirectional = family == "bert" if bidirectional is None else bidirectional
    layout, ref_layout = discover(ours), discover(reference)
    if layout.n_layer != ref_layout.n_layer:
        raise ValueError(f"{layout.blocks} has {layout.n_layer} blocks, the reference {ref_layout.n_layer}")
    batch = make_batch(vocab_size, seq_len, seed, bidirectional)
    with _eval_fp32(ours, reference):
        t_ours = trace(ours, layout, batch, bidirectional, grad=True, call=call_ours)
        t_ref = trace(reference, ref_layout, batch, bidirectional, grad=True)
        sites = compare(t_ours, t_ref, layout, ref_layout)
        _backward(ours, reference, t_ours, t_ref, batch, layout, ref_layout, sites)
        first = next((s for s in sites if s.diverged), None) or next((s for s in sites if s.grad_diverged), None)
        if first is None:
            return Diagnosis(False, None, sites, [])
        if not first.diverged:  # forward at parity, gradients not
            where = first.site if first.block is None else f"{first.site} of block {first.block}"
            return Diagnosis(True, first, sites, [Suspect("backward", 1.0, CATALOGUE["backward"].replace(
                "{note}", where))])
        ctx = Context(ours, reference, layout, ref_layout, batch, bidirectional, t_ours, t_ref, call_ours)
        ev = probe(ctx, first)
    return Diagnosis(True, first, sites, rank(ev, bidirectional), ev)


def _backward(ours, reference, t_ours, t_ref, batch, layout, ref_layout, sites) -> None:
    for module, tr in ((ours, t_ours), (reference, t_ref)):
        module.zero_grad(set_to_none=True)
        next_token_loss(tr.logits, batch).backward()
    compare_grads(ours, reference, layout, ref_layout, sites)
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)


def probe(ctx: Context, first: SiteDiff) -> Evidence:
    key = (first.site, first.block)
    ev = Evidence(first.site, first.block, first.rel_diff)
    tol = first.tolerance
    with torch.no_grad():
        _position_probes(ev, ctx, key, tol)
        _t1_probe(ev, ctx, key, tol)
        _leak_probe(ev, ctx, key, tol)
        _isolation_probe(ev, ctx, tol)
        _wiring_probes(ev, ctx)
        _structure_probes(ev, ctx)
        if first.diverged:
            _run_counterfactuals(ev, ctx, key, first.max_abs_diff)
    return ev


def plot(diagnosis: Diagnosis, path: str | Path, title: str = "") -> Path:
    """Max |difference| per site on a log scale, with each site's tolerance and the first divergence marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s.site if s.block is None else f"{s.site}{s.block}" for s in diagnosis.sites]
    floor = 1e-12
    values = [max(s.max_abs_diff, floor) if math.isfinite(s.max_abs_diff) else 1e6 for s in diagnosis.sites]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels)), 3.5))
    ax.semilogy(range(len(values)), values, "o-", label="max |ours - reference|")
    ax.semilogy(range(len(values)), [s.tolerance for s in diagnosis.sites], "k--", lw=1, label="tolerance")
    if diagnosis.first is not None and diagnosis.first in diagnosis.sites:
        i = diagnosis.sites.index(diagnosis.first)
        ax.axvline(i, color="red", lw=1, label=f"first divergence: {labels[i]}")
    ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    ax.set_ylabel(f"max |diff| (values < {floor:g} drawn at {floor:g})", fontsize=7)
    ax.set_title(title or "difference per site", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def as_dict(ev: Evidence | None) -> dict[str, Any]:
    return {} if ev is None else asdict(ev)
