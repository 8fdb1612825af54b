"""What kind of number a metric is, for printing and judging it: one rule for the report, the terminal
table of `harness run` and `harness list tasks`.

    count       texts, tokens, mismatches: integers
    flag        *_equal: 1 (yes) or 0 (no); a scratch model must reach 1
    diff        parity's max |scratch - reference| (a `threshold`): scientific notation
    perplexity  word/byte/token perplexity
    rate        accuracy, F1, correlations, valid rates: fractions
    timing      seconds, tokens/s, memory, MFU, FLOP/s: machine-bound, judged apart (within TIMING_FACTOR)
    loss        everything else (losses, nats, bits)

A task states a metric's kind with `MetricSpec(kind=...)`; otherwise it is read off the metric's name.
"""

from __future__ import annotations

from typing import Any

TIMING_FACTOR = 2.0  # a timing agrees when scratch / reference is within [1/2, 2]

# The report's scorecard metric per built-in task; a plugin task names its own with `Task.headline`.
HEADLINES = {
    "ppl": "word_perplexity",
    "parity": "max_abs_logit_diff",
    "glue": "accuracy",
    "seq2seq": "exact_match",
    "ngram-rules": "valid_rate",
    "char-ppl": "bits_per_char",
    "throughput": "prefill_tokens_per_s",
    "bpe-parity": "mismatches",
    "bpe-train": "bytes_per_token",
    "train": "val_loss",
    "autograd-fit": "final_loss",
    "rl-rules": "valid_rate_after",
    "mutants": "caught_rate",
}

_COUNTS = {"texts", "tokens", "mismatches", "roundtrip_failures", "steps", "documents", "words", "bytes"}
_RATES = {"accuracy", "f1", "exact_match", "token_accuracy", "matthews_correlation", "pearson", "spearmanr"}
_TIMING_WORDS = ("seconds", "per_s", "peak_memory", "mfu", "flops", "time_ratio")


def metric_kind(metric: str, spec: Any = None) -> str:
    """count | flag | diff | perplexity | rate | timing | loss: the spec's `kind`, else read off the name."""
    if spec is not None and getattr(spec, "kind", None):
        return spec.kind
    if any(word in metric for word in _TIMING_WORDS):
        return "timing"
    if metric.endswith("_equal"):
        return "flag"
    if metric in _COUNTS or metric.endswith(("_count", "_failures")) or metric.startswith("n_"):
        return "count"
    if "diff" in metric or (spec is not None and getattr(spec, "threshold", None) is not None):
        return "diff"
    if "perplexity" in metric:
        return "perplexity"
    if metric in _RATES or metric.endswith(("_rate", "accuracy")):
        return "rate"
    return "loss"


def pair_rule(metric: str, spec: Any) -> str:
    """How a scratch model's value of `metric` is held to its reference's, in a few words."""
    kind = metric_kind(metric, spec)
    if getattr(spec, "threshold", None) is not None:
        return f"<= {spec.threshold:g}"
    if kind == "flag":
        return "== 1"
    if kind == "timing":
        return f"timing: within {TIMING_FACTOR:g}x"
    atol, rtol = getattr(spec, "pair_atol", 0.0), getattr(spec, "pair_rtol", 0.0)
    parts = ([f"±{atol:g}"] if atol else []) + ([f"±{rtol:g} x ref"] if rtol else [])
    return " + ".join(parts) + " (or the 95% stderr band)" if parts else "equal (or within the 95% stderr band)"


def headline_metric(task: str, task_class: Any = None) -> str | None:
    """The metric the scorecard shows for `task`: the class's `headline`, else the built-in choice."""
    return getattr(task_class, "headline", None) or HEADLINES.get(task)
