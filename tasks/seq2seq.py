"""Task `seq2seq`: train an encoder-decoder on generated digit problems, then decode greedily.

Three seeded, offline subtasks over digit strings of `min_len`..`max_len` digits, each source
starting with a one-letter tag so that one model learns all of them:
  reverse  "r40213"  -> "31204"
  sort     "s40213"  -> "01234"
  add      "a352+89" -> "441"   (addends have 1..max_len // 2 digits)
The eval examples are drawn first and no training source repeats an eval source.

Training follows Vaswani et al. 2017: Adam with beta1 0.9, beta2 0.98, eps 1e-9 (Sec. 5.3), the
warm-up / inverse-square-root rate `lr_factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)`
(`noam_lr`, Sec. 5.3), label smoothing 0.1 (Sec. 5.4), the model's own dropout. Both models of a pair
start from the same `--weights` and see identical batches in identical order; dropout masks differ
between implementations, so their curves differ by seed-level noise. The model's weights are restored
after the task, so later tasks in the same run see the loaded weights.

Metrics, per subtask, from greedy decoding of `eval_examples` sources (targets cut at </s>):
  exact_match     fraction of predictions equal to the target;
  token_accuracy  over target positions plus the final </s>: the fraction where the prediction has
                  the same token (a prediction that stops early misses the remaining positions);
each with a bootstrap standard error (`stderr`) and 95% interval (`extra.ci_low`, `extra.ci_high`).
Overall: `train_seconds`, `final_train_loss` (mean label-smoothed loss over the last 10% of steps).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from harness.api import (
    TASKS,
    Capability,
    HarnessError,
    Metric,
    MetricSpec,
    ModelAdapter,
    RunContext,
    Task,
    UnknownNameError,
    pad_right,
    torch_threads,
)
from reproductions.transformer import label_smoothed_nll, noam_lr
from tasks.common import ci_cell


@dataclass(frozen=True)
class Seq2SeqConfig:
    subtasks: tuple[str, ...] = ("reverse", "sort", "add")
    source: Literal["synthetic", "hub"] = "synthetic"  # hub: real translation data (not available, see docs)
    steps: int = 1500  # optimizer steps
    train_examples: int = 30000  # generated training pairs, split evenly over the subtasks
    eval_examples: int = 200  # per subtask (--limit caps it)
    batch_size: int = 64
    min_len: int = 2  # digits in a reverse/sort source
    max_len: int = 8  # addends have 1 .. max_len // 2 digits
    lr_factor: float = 1.0  # scale of the Noam rate; 1.0 is the paper's
    warmup: int = 400  # warm-up steps (the paper: 4000 of 100k)
    label_smoothing: float = 0.1  # eps_ls (Sec. 5.4)
    bootstrap: int = 1000  # resamples for stderr and the 95% interval; 0: none
    eval_batch_size: int = 200
    threads: int = 1  # torch threads while training and decoding (tiny models run fastest on 1); 0: torch's


@dataclass(frozen=True)
class Example:
    subtask: str
    source: str
    target: str


def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(map(str, rng.integers(0, 10, n)))


def _number(rng: np.random.Generator, max_digits: int) -> int:
    return int(rng.integers(0, 10 ** int(rng.integers(1, max_digits + 1))))


def reverse(rng: np.random.Generator, cfg: Seq2SeqConfig) -> Example:
    s = _digits(rng, int(rng.integers(cfg.min_len, cfg.max_len + 1)))
    return Example("reverse", "r" + s, s[::-1])


def sort(rng: np.random.Generator, cfg: Seq2SeqConfig) -> Example:
    s = _digits(rng, int(rng.integers(cfg.min_len, cfg.max_len + 1)))
    return Example("sort", "s" + s, "".join(sorted(s)))


def add(rng: np.random.Generator, cfg: Seq2SeqConfig) -> Example:
    a, b = _number(rng, max(1, cfg.max_len // 2)), _number(rng, max(1, cfg.max_len // 2))
    return Example("add", f"a{a}+{b}", str(a + b))


SUBTASKS: dict[str, Callable[[np.random.Generator, Seq2SeqConfig], Example]] = {
    "reverse": reverse, "sort": sort, "add": add}


def make_split(cfg: Seq2SeqConfig, seed: int, n_eval: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): eval drawn first per subtask; train sources never repeat an eval source."""
    rng = np.random.default_rng([seed, 7])
    evals = [SUBTASKS[name](rng, cfg) for name in cfg.subtasks for _ in range(n_eval)]
    held_out = {e.source for e in evals}
    train: list[Example] = []
    per_task = max(1, cfg.train_examples // len(cfg.subtasks))
    for name in cfg.subtasks:
        made, tries = [], 0
        while len(made) < per_task and tries < 20 * per_task:  # small spaces (2-digit strings) run dry
            tries += 1
            ex = SUBTASKS[name](rng, cfg)
            if ex.source not in held_out:
                made.append(ex)
        train += made
    return train, evals


# -- batches -------------------------------------------------------------------------------------


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) right-padded sources
    src_mask: torch.Tensor  # (B, S) 1 for real tokens
    tgt_in: torch.Tensor  # (B, T) <s> + target, right-padded
    tgt_out: torch.Tensor  # (B, T) target + </s>, padding = -100 (ignored by the loss)


def encode(model: ModelAdapter, examples: list[Example]) -> tuple[list[list[int]], list[list[int]]]:
    tok = model.tokenizer
    return tok.encode_batch([e.source for e in examples]), tok.encode_batch([e.target for e in examples])


def make_batch(model: ModelAdapter, sources: list[list[int]], targets: list[list[int]]) -> Batch:
    pad, bos, eos = model.tokenizer.pad_id, model.bos_id, model.eos_id
    src, src_mask = pad_right(sources, pad, model.device)
    tgt_in, _ = pad_right([[bos, *t] for t in targets], pad, model.device)
    tgt_out, out_mask = pad_right([[*t, eos] for t in targets], pad, model.device)
    return Batch(src, src_mask, tgt_in, tgt_out.masked_fill(out_mask == 0, -100))


def step_rows(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of every step: seeded permutations (one per epoch) cut into batches."""
    g = torch.Generator().manual_seed(seed)
    rows: list[list[int]] = []
    while len(rows) < steps:
        order = torch.randperm(n, generator=g).tolist()
        rows += [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [order]
    return rows[:steps]


# -- training and decoding -----------------------------------------------------------------------


def train(model: ModelAdapter, train_set: list[Example], cfg: Seq2SeqConfig, ctx: RunContext) -> list[float]:
    """Adam + Noam schedule + label smoothing on `model.module`, in place; returns the step losses."""
    sources, targets = encode(model, train_set)
    module = model.module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    d_model = model.weights.hf_config.d_model
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.lr_factor * noam_lr(s + 1, d_model, cfg.warmup))
    torch.manual_seed(ctx.seed)  # dropout masks: reproducible per implementation, not across them
    losses = []
    batches = step_rows(len(train_set), cfg.batch_size, cfg.steps, ctx.seed)
    for rows in ctx.track(batches, total=len(batches), description=f"seq2seq train {model.name}"):
        b = make_batch(model, [sources[i] for i in rows], [targets[i] for i in rows])
        loss = label_smoothed_nll(model.seq2seq_logits(b.src, b.src_mask, b.tgt_in).float(), b.tgt_out,
                                  eps=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    module.eval()
    return losses


def predict(model: ModelAdapter, examples: list[Example], cfg: Seq2SeqConfig) -> list[list[int]]:
    sources, targets = encode(model, examples)
    n_new = min(max(len(t) for t in targets) + 1, model.max_length - 1)
    out: list[list[int]] = []
    for start in range(0, len(sources), cfg.eval_batch_size):
        out += model.greedy_batch(sources[start : start + cfg.eval_batch_size], n_new)
    return out


def token_hits(pred: list[int], target: list[int], eos: int) -> tuple[int, int]:
    """(matching positions, positions) over target + </s>."""
    want, got = [*target, eos], [*pred, eos]
    return sum(a == b for a, b in zip(want, got)), len(want)


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float | None
    low: float | None
    high: float | None


def ratio_bootstrap(num: np.ndarray, den: np.ndarray, resamples: int, seed: int) -> Estimate:
    """sum(num) / sum(den), with a percentile bootstrap over examples (Efron & Tibshirani 1993)."""
    value = float(num.sum() / den.sum())
    if resamples <= 0 or len(num) < 2:
        return Estimate(value, None, None, None)
    rows = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    values = num[rows].sum(axis=1) / den[rows].sum(axis=1)
    low, high = np.percentile(values, [2.5, 97.5])
    return Estimate(value, float(values.std(ddof=1)), float(low), float(high))


# -- the task ------------------------------------------------------------------------------------

_SCORE = MetricSpec(higher_is_better=True)  # pair slack comes from the bootstrap stderr


class Seq2Seq(Task):
    name = "seq2seq"
    version = "1.0"
    description = "train on generated reverse/sort/add digit problems, greedy-decode: exact match, token accuracy"
    config_class = Seq2SeqConfig
    needs = frozenset({Capability.SEQ2SEQ})
    metrics = {
        "exact_match": _SCORE,
        "token_accuracy": _SCORE,
        # wall-clock time on shared machines: reported, compared loosely (2x) and never a pair failure
        "train_seconds": MetricSpec(higher_is_better=False, pair_rtol=1.0, gate_rtol=1.0),
        # different dropout masks: the two implementations' losses differ by a few percent
        "final_train_loss": MetricSpec(higher_is_better=False, pair_rtol=0.1, gate_rtol=0.1),
    }

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__(config)
        unknown = [s for s in config.subtasks if s not in SUBTASKS]
        if unknown or not config.subtasks:
            raise UnknownNameError(f"unknown seq2seq subtask(s) {unknown or '(none given)'}; "
                                   f"known: {', '.join(SUBTASKS)}")
        if config.source == "hub":
            raise HarnessError("seq2seq.source=hub is not available: real translation data needs a subword "
                               "vocabulary and BLEU (docs/reproductions.md); use seq2seq.source=synthetic")
        if not 1 <= config.min_len <= config.max_len:
            raise HarnessError(f"seq2seq: need 1 <= min_len <= max_len, got {config.min_len}, {config.max_len}")

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        n_eval = self.config.eval_examples if ctx.limit is None else min(self.config.eval_examples, ctx.limit)
        train_set, eval_set = make_split(self.config, ctx.seed, n_eval)
        self._check_fits(model, train_set + eval_set)
        saved = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        try:
            with torch_threads(self.config.threads):
                start = time.perf_counter()
                losses = train(model, train_set, self.config, ctx)
                seconds = time.perf_counter() - start
                preds = predict(model, eval_set, self.config)
        finally:
            model.module.load_state_dict(saved)
            model.module.eval()
        yield from self.scores(model, eval_set, preds, ctx.seed)
        info = {"steps": len(losses), "n_train": len(train_set), "first_train_loss": losses[0] if losses else None}
        tail = losses[-max(1, len(losses) // 10):]
        yield self.metric("final_train_loss", float(np.mean(tail)), n=len(losses), extra=info)
        yield self.metric("train_seconds", seconds, n=len(losses), extra=info)

    def _check_fits(self, model: ModelAdapter, examples: list[Example]) -> None:
        longest = max(len(e.source) for e in examples) + 1
        if longest > model.max_length:
            raise HarnessError(f"seq2seq: sources of {longest} tokens exceed {model.name}'s {model.max_length}; "
                               "lower seq2seq.max_len")

    def scores(self, model: ModelAdapter, examples: list[Example], preds: list[list[int]], seed: int):
        _, targets = encode(model, examples)
        for name in self.config.subtasks:
            idx = [i for i, e in enumerate(examples) if e.subtask == name]
            hits = np.array([token_hits(preds[i], targets[i], model.eos_id) for i in idx], dtype=float)
            exact = np.array([float(preds[i] == targets[i]) for i in idx])
            samples = [{"source": examples[i].source, "target": examples[i].target,
                        "prediction": model.tokenizer.decode(preds[i])} for i in idx[:3]]
            resamples = self.config.bootstrap
            estimates = {"exact_match": ratio_bootstrap(exact, np.ones_like(exact), resamples, seed),
                         "token_accuracy": ratio_bootstrap(hits[:, 0], hits[:, 1], resamples, seed)}
            for metric, est in estimates.items():
                extra = {"ci_low": est.low, "ci_high": est.high, "ci_level": 0.95, "samples": samples}
                yield self.metric(metric, est.value, subtask=name, n=len(idx), stderr=est.stderr, extra=extra)

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        return seq2seq_table(history)


def seq2seq_table(history: pd.DataFrame) -> str:
    """Markdown: one row per subtask, exact match [95% CI] per (model, weights), then budget and time."""
    from harness.api import latest

    rows = latest(history)
    scores = rows[rows["metric"] == "exact_match"]
    if scores.empty:
        return ""
    columns = sorted(set(zip(scores["model"], scores["weights"])))
    lines = ["### seq2seq summary: exact match x 100 [95% CI]", "",
             "| subtask | " + " | ".join(f"{m} (`{w}`)" for m, w in columns) + " |", "|---|" + "---|" * len(columns)]
    for sub, block in scores.groupby("subtask", sort=True):
        cells = [ci_cell(block[(block["model"] == m) & (block["weights"] == w)]) for m, w in columns]
        lines.append(f"| {sub} | " + " | ".join(cells) + " |")
    for metric in ("final_train_loss", "train_seconds"):
        cells = [_plain(rows, m, w, metric) for m, w in columns]
        lines.append(f"| _{metric}_ | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plain(rows: pd.DataFrame, model: str, weights: str, metric: str) -> str:
    hit = rows[(rows["model"] == model) & (rows["weights"] == weights) & (rows["metric"] == metric)]
    return "-" if hit.empty else f"{hit.iloc[-1]['value']:.3g}"


TASKS.add(Seq2Seq.name, Seq2Seq.description, Seq2Seq)
