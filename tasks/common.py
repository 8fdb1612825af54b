"""Helpers several tasks share (report cells); the harness API is in `harness.api`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# The character-level ladder (harness/models/charlm.py) in the order the report reads it: one idea at a time.
LADDER_ORDER = ("bigram", "trigram", "mlp-ngram", "rnn", "lstm", "gru", "char-gpt-scratch", "char-gpt-hf")


def ladder_refusal(task: str, model: str) -> str:
    """The one-line refusal of ngram-rules and char-ppl for a model that is not one of the ladder's."""
    return f"{task} trains its own models; '{model}' is not one of: {', '.join(LADDER_ORDER)}"


# The autograd-fit contestants (harness/models/charlm.py): our scalar engine and two torch references.
FITTERS = ("autograd-scratch", "autograd-torch", "autograd-torch-nn")

def ci_cell(block: pd.DataFrame) -> str:
    """The newest row of `block` as a percentage with its 95% interval, "81.2 [77.8, 84.8]" ("-": no row)."""
    if block.empty:
        return "-"
    row = block.iloc[-1]
    extra = row["extra"] if isinstance(row["extra"], dict) else {}
    if extra.get("ci_low") is not None:
        return f"{100 * row['value']:.1f} [{100 * extra['ci_low']:.1f}, {100 * extra['ci_high']:.1f}]"
    return f"{100 * row['value']:.1f}"


def mean_interval(values: list[float], clip: bool = False) -> tuple[float, float | None, float, float]:
    """Mean of `values`, its standard error and a 95% Student-t interval (clipped to [0, 1] for rates);
    for a single value (value, None, value, value). Seeds of ngram-rules and an LLM's samples use it."""
    import math

    from scipy.stats import t as scipy_t

    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None, mean, mean
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    half = float(scipy_t.ppf(0.975, len(values) - 1)) * stderr
    low, high = mean - half, mean + half
    return (mean, stderr, max(0.0, low), min(1.0, high)) if clip else (mean, stderr, low, high)
