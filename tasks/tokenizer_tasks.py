"""Tasks for tokenizers (capability TOKENIZE): `bpe-parity` and `bpe-train`.

`bpe-parity`: the model's tokenizer files (GPT-2's real `encoder.json` / `vocab.bpe` by default)
encode every line of the vendored WikiText-2 test split (raw, newlines kept) and every GLUE
sentence under tasks/data/glue (tasks/data/README.md). Per source (subtask `wikitext2-test`,
`glue`): `texts`, `tokens`, `roundtrip_failures` (texts where decode(encode(t)) != t) and, for a
scratch model, `mismatches`: texts whose ids differ from its reference's (the goal is 0; the first
one is kept in `extra.first_mismatch`). `--limit N` keeps the first N texts of each source.

`bpe-train`: train on Tiny Shakespeare (tasks/data/tinyshakespeare/input.txt), first 90% of the
lines; held out: the rest. Per vocabulary size (subtask `vocab1000`, ...): `bytes_per_token` on the
held-out text (UTF-8 bytes / tokens; higher compresses better) and `train_seconds`. A scratch model
also trains its reference in the same run, on the same lines, and adds `train_time_ratio` (its
seconds / the reference's: how many times slower) and `merges_equal` (1 if both learned the same
merges in the same order). `--limit N` keeps the first N lines of each part.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.api import TASKS, Capability, Metric, MetricSpec, ModelAdapter, RunContext, Task, UnknownNameError
from tasks.tokenizer_compare import DATA, glue_sentences, split_held_out, wikitext_lines

SOURCES = {
    "wikitext2-test": lambda: wikitext_lines(DATA / "wikitext-2-raw" / "wiki.test.raw"),
    "glue": lambda: glue_sentences(DATA / "glue"),
}
CHUNK = 5000  # texts per progress step


@dataclass(frozen=True)
class BpeParityConfig:
    subtasks: tuple[str, ...] = ("wikitext2-test", "glue")


class BpeParity(Task):
    name = "bpe-parity"
    version = "1.0"
    description = "GPT-2's merges in both tokenizers: id mismatches and round trips on WikiText-2 test + GLUE"
    config_class = BpeParityConfig
    needs = frozenset({Capability.TOKENIZE})
    metrics = {
        "mismatches": MetricSpec(higher_is_better=False, threshold=0.0),
        "roundtrip_failures": MetricSpec(higher_is_better=False, threshold=0.0),
        "texts": MetricSpec(higher_is_better=None),
        "tokens": MetricSpec(higher_is_better=None),  # scratch and reference must agree exactly
    }

    def __init__(self, config: BpeParityConfig) -> None:
        super().__init__(config)
        unknown = [s for s in config.subtasks if s not in SOURCES]
        if unknown or not config.subtasks:
            raise UnknownNameError(f"unknown bpe-parity subtask(s) {unknown or '(none)'}; known: {', '.join(SOURCES)}")

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        reference = ctx.reference(model)
        for sub in self.config.subtasks:
            texts = SOURCES[sub]()[: ctx.limit]
            ours = encode_all(model, texts, ctx, sub)
            yield self.metric("texts", len(texts), subtask=sub, n=len(texts))
            yield self.metric("tokens", sum(map(len, ours)), subtask=sub, n=len(texts))
            failures = sum(model.decode(ids) != t for ids, t in zip(ours, texts))
            yield self.metric("roundtrip_failures", failures, subtask=sub, n=len(texts))
            if reference is not None:
                yield self.mismatches(texts, ours, encode_all(reference, texts, ctx, sub), sub, reference.name)

    def mismatches(self, texts: list[str], ours: list[list[int]], theirs: list[list[int]], sub: str,
                   reference: str) -> Metric:
        bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        extra: dict = {"reference": reference}
        if bad:
            i = bad[0]
            extra["first_mismatch"] = {"index": i, "text": texts[i][:200], "ours": ours[i][:50],
                                       "reference": theirs[i][:50]}
        return self.metric("mismatches", len(bad), subtask=sub, n=len(texts), extra=extra)

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        return summary_table(history, "bpe-parity summary", ["texts", "tokens", "mismatches", "roundtrip_failures"])


def encode_all(model: ModelAdapter, texts: list[str], ctx: RunContext, sub: str) -> list[list[int]]:
    starts = range(0, len(texts), CHUNK)
    out: list[list[int]] = []
    for start in ctx.track(starts, total=len(starts), description=f"bpe-parity {sub} {model.name}"):
        out += model.encode_batch(texts[start : start + CHUNK])
    return out


@dataclass(frozen=True)
class BpeTrainConfig:
    vocab_sizes: tuple[int, ...] = (1000, 2000, 4000)
    held_out_fraction: float = 0.1  # last lines of Tiny Shakespeare, never trained on
    min_frequency: int = 2  # a pair must occur this often to be merged (both implementations)


class BpeTrain(Task):
    name = "bpe-train"
    version = "1.0"
    description = "train BPE on Tiny Shakespeare per vocab size: held-out bytes/token, train seconds vs tokenizers"
    config_class = BpeTrainConfig
    needs = frozenset({Capability.TOKENIZE})
    metrics = {
        "bytes_per_token": MetricSpec(higher_is_better=True),  # equal merges give equal values
        # wall-clock seconds: a pure-Python trainer is expected to be slower than Rust; never a pair failure
        "train_seconds": MetricSpec(higher_is_better=False, pair_rtol=math.inf, gate_rtol=1.0),
        "train_time_ratio": MetricSpec(higher_is_better=False, gate_rtol=1.0),
        "merges_equal": MetricSpec(higher_is_better=True),
    }

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        text = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
        train_text, held_out = split_held_out(text, self.config.held_out_fraction)
        lines = train_text.splitlines(keepends=True)[: ctx.limit]
        held_out = "".join(held_out.splitlines(keepends=True)[: ctx.limit])
        reference = ctx.reference(model)
        for size in ctx.track(self.config.vocab_sizes, total=len(self.config.vocab_sizes),
                              description=f"bpe-train {model.name}"):
            yield from self.one_size(model, reference, lines, held_out, size)

    def one_size(self, model: ModelAdapter, reference: ModelAdapter | None, lines: list[str], held_out: str,
                 size: int) -> Iterator[Metric]:
        sub, n_bytes = f"vocab{size}", len(held_out.encode("utf-8"))
        bpe, seconds = timed(model.train_bpe, lines, size, self.config.min_frequency)
        n_tokens = len(bpe.encode_batch([held_out])[0])
        info = {"n_merges": len(bpe.merges), "held_out_bytes": n_bytes, "train_lines": len(lines)}
        yield self.metric("bytes_per_token", n_bytes / max(n_tokens, 1), subtask=sub, n=n_tokens, extra=info)
        yield self.metric("train_seconds", seconds, subtask=sub, n=len(lines), extra=info)
        if reference is None:
            return
        theirs, their_seconds = timed(reference.train_bpe, lines, size, self.config.min_frequency)
        extra = {**info, "reference": reference.name, "reference_seconds": their_seconds}
        yield self.metric("train_time_ratio", seconds / their_seconds, subtask=sub, n=len(lines), extra=extra)
        yield self.metric("merges_equal", float(bpe.merges == theirs.merges), subtask=sub,
                          n=len(bpe.merges), extra={**extra, "reference_n_merges": len(theirs.merges)})

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        metrics = ["bytes_per_token", "train_seconds", "train_time_ratio", "merges_equal"]
        return summary_table(history, "bpe-train summary", metrics)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def summary_table(history: pd.DataFrame, title: str, metrics: list[str]) -> str:
    """Markdown: one row per (model, subtask), one column per metric (newest values)."""
    from harness.api import latest

    rows = latest(history)
    rows = rows[rows["metric"].isin(metrics)]
    if rows.empty:
        return ""
    table = rows.pivot_table(index=["model", "subtask"], columns="metric", values="value", aggfunc="last")
    cols = [m for m in metrics if m in table.columns]
    lines = [f"### {title}", "", "| model | subtask | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for (model, sub), row in table.iterrows():
        lines.append(f"| {model} | {sub} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.4g}"


TASKS.add(BpeParity.name, BpeParity.description, BpeParity)
TASKS.add(BpeTrain.name, BpeTrain.description, BpeTrain)
