"""Where and why a reproduction diverges from its reference: aligned hooks, probes, ranked suspects.

    report = diagnose(ours, reference, family="gpt2", seq_len=16, seed=0)
    report.first            # the first site past tolerance, in forward order, e.g. attn of block 0
    report.suspects         # ranked causes, each in words with its fix

Both arguments are plain `nn.Module`s holding identical weights (ours: a reproduction or a user's
module; reference: the transformers model); `family` is the architecture (`gpt2`, `llama`, `bert`,
...). No reproduction is imported. docs/diagnose.md describes the sites, the tolerance and the
catalogue. The package, in the order a diagnosis runs:

  sites.py            the aligned sites of a model (`discover`), the batch, hooked forwards (`trace`)
  compare.py          per-site differences, the tolerance rule (`tolerance`), gradients (`compare_grads`)
  probes.py           targeted probes at the first divergent site (`Evidence`, `Context`)
  counterfactuals.py  the reference changed in exactly one known way, the first site measured again
  suspects.py         the catalogue of causes (`CATALOGUE`) and their ranking (`rank`)
  core.py             the whole diagnosis (`diagnose`, `Diagnosis`, `probe`, `plot`)
"""

from __future__ import annotations

from harness.api.diagnosis.compare import SiteDiff, compare, compare_grads, next_token_loss, tolerance
from harness.api.diagnosis.core import Diagnosis, as_dict, diagnose, plot, probe
from harness.api.diagnosis.counterfactuals import Counterfactual, counterfactuals
from harness.api.diagnosis.probes import Context, Evidence
from harness.api.diagnosis.sites import (
    ATOL,
    ATTN_NAMES,
    EMBED_NAMES,
    MLP_NAMES,
    SITES,
    Batch,
    Call,
    Layout,
    Trace,
    call_model,
    discover,
    make_batch,
    rerun_with,
    trace,
)
from harness.api.diagnosis.suspects import CATALOGUE, Suspect, rank

__all__ = [
    "ATOL", "ATTN_NAMES", "CATALOGUE", "EMBED_NAMES", "MLP_NAMES", "SITES", "Batch", "Call", "Context",
    "Counterfactual", "Diagnosis", "Evidence", "Layout", "SiteDiff", "Suspect", "Trace", "as_dict", "call_model",
    "compare", "compare_grads", "counterfactuals", "diagnose", "discover", "make_batch", "next_token_loss", "plot",
    "probe", "rank", "rerun_with", "tolerance", "trace",
]
