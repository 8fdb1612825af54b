"""Task `glue`: fine-tune a fresh classification head plus the whole model on GLUE tasks, score on dev.

GLUE: Wang et al., "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
Understanding", ICLR 2019. Data: the vendored TSVs in tasks/data/glue (see tasks/data/README.md),
or `glue.source=hub` for `nyu-mll/glue` through `datasets` (needs the network or a warm cache).

Subtasks and metrics (GLUE's): sst2, rte, wnli, qnli `accuracy`; cola `matthews_correlation`;
mrpc `accuracy` and `f1` (positive class: paraphrase); stsb `pearson` and `spearmanr` (a
regression head, num_labels = 1, trained with mean-squared error). Every metric carries a
bootstrap 95% interval over the dev examples (`extra.ci_low`, `extra.ci_high`) and its bootstrap
standard deviation as `stderr`; `train_seconds` times the fine-tuning. qnli has no vendored train
split: with the local source it is skipped with a warning.

Recipe (Devlin et al. 2019, Section 4.1 and Appendix A.3): AdamW (Loshchilov & Hutter 2019;
betas 0.9/0.999, eps 1e-6, weight decay on matrices only), linear warmup over the first
`warmup_ratio` of the steps then linear decay to zero, gradient norm clipped at 1.0, dropout 0.1.
The seed fixes the training subset and batch order, the dev subset, the head's initial tensors
and the bootstrap resamples, so a scratch model and its reference see identical data and start
from identical weights. Dropout masks are shared only where two implementations draw them in the
same order (our BERT and transformers' do, so their runs coincide to float rounding); otherwise two
fine-tuning runs differ by ordinary seed-level noise as well as by any implementation bug. Judge a
scratch/reference gap against the intervals, and expect small dev sets (RTE, MRPC, WNLI) to be noisy.
A non-finite training loss stops the subtask with the step it happened at.

Default budget (`GlueConfig`): sst2, mrpc and stsb; 3,000 training examples, 1 epoch, batch 16,
lr 1e-4, at most 128 tokens and 500 dev examples each: a budget that learns on the `minilm` weights
on a CPU (docs/glue.md has the measurements and what larger budgets need).
"""

from __future__ import annotations

import csv
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

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
)
from tasks.common import ci_cell

if TYPE_CHECKING:
    import datasets
    import pandas as pd

DATA_DIR = Path(__file__).resolve().parent / "data" / "glue"
HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueSubtask:
    name: str  # as in nyu-mll/glue: "sst2"
    folder: str  # under tasks/data/glue: "SST-2"
    columns: tuple[str, ...]  # the TSV's columns (CoLA has no header: these are our names)
    text_columns: tuple[str, ...]  # one (single sentence) or two (pair) columns, in both sources
    label_column: str
    labels: tuple[str, ...] | None  # label strings in the hub's id order; None: regression
    metrics: tuple[str, ...]
    header: bool = True
    hub_text_columns: tuple[str, ...] | None = None  # when the hub names them differently
    has_local_train: bool = True

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


_PAIR = ("index", "sentence1", "sentence2", "label")
SUBTASKS: dict[str, GlueSubtask] = {s.name: s for s in (
    GlueSubtask("sst2", "SST-2", ("sentence", "label"), ("sentence",), "label", ("0", "1"), ("accuracy",)),
    GlueSubtask("cola", "CoLA", ("source", "label", "annotation", "sentence"), ("sentence",), "label",
                ("0", "1"), ("matthews_correlation",), header=False),
    GlueSubtask("mrpc", "MRPC", ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                ("#1 String", "#2 String"), "Quality", ("0", "1"), ("accuracy", "f1"),
                hub_text_columns=("sentence1", "sentence2")),
    GlueSubtask("rte", "RTE", _PAIR, ("sentence1", "sentence2"), "label",
                ("entailment", "not_entailment"), ("accuracy",)),
    GlueSubtask("wnli", "WNLI", _PAIR, ("sentence1", "sentence2"), "label", ("0", "1"), ("accuracy",)),
    GlueSubtask("qnli", "QNLI", ("index", "question", "sentence", "label"), ("question", "sentence"), "label",
                ("entailment", "not_entailment"), ("accuracy",), has_local_train=False),
    GlueSubtask("stsb", "STS-B", ("index", "genre", "filename", "year", "old_index", "source1", "source2",
                                  "sentence1", "sentence2", "score"),
                ("sentence1", "sentence2"), "score", None, ("pearson", "spearmanr"),
                hub_text_columns=("sentence1", "sentence2")),
)}


@dataclass(frozen=True)
class GlueConfig:
    """Defaults: a CPU budget that visibly learns on `minilm` (see docs/glue.md for the measurements).
    Devlin et al.'s full recipe is max_train_examples=none, epochs=3, lr 2e-5..5e-5: hours on a CPU."""

    subtasks: tuple[str, ...] = ("sst2", "mrpc", "stsb")  # cola, rte, wnli stay at chance at this budget
    lr: float = 1e-4  # 2e-5 stays at chance on MiniLM with ~1k examples and 1 epoch
    epochs: int = 1
    batch_size: int = 16  # in BERT's grid (16, 32); twice the updates of 32 at about the same cost
    max_train_examples: int | None = 3000  # a seeded random subset of train; None: all
    max_seq_len: int = 128  # tokens per example (pair included), truncated longest-first
    eval_batch_size: int = 64
    warmup_ratio: float = 0.1  # linear warmup over this fraction of the steps, then linear decay
    weight_decay: float = 0.01  # on weight matrices; none on biases and norms
    max_eval_examples: int | None = 500  # a seeded random subset of dev; None: all
    source: Literal["local", "hub"] = "local"  # vendored TSVs, or nyu-mll/glue via datasets
    bootstrap: int = 1000  # resamples for the 95% interval and stderr; 0: none


# -- data ----------------------------------------------------------------------------------------


def subtask(name: str) -> GlueSubtask:
    if name not in SUBTASKS:
        known = ", ".join(sorted(SUBTASKS))
        raise UnknownNameError(f"unknown GLUE subtask '{name}'; known subtasks: {known}")
    return SUBTASKS[name]


def read_tsv(path: Path, columns: tuple[str, ...], header: bool) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every data row: quoting off, a BOM stripped, the header checked."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [(reader.line_num, row) for row in reader]  # no quoting: one line per row
    except FileNotFoundError as e:
        raise HarnessError(f"GLUE data file '{path}' not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise HarnessError(f"cannot read '{path}' as UTF-8 TSV: {e}") from e
    if header:
        found = tuple(rows[0][1]) if rows else ()
        if found != columns:
            raise HarnessError(f"{path}:1: expected the header {list(columns)}, found {list(found)}")
        rows = rows[1:]
    for line, row in rows:
        if len(row) != len(columns):
            raise HarnessError(f"{path}:{line}: expected {len(columns)} tab-separated fields, "
                               f"found {len(row)}")
    return rows


def parse_label(sub: GlueSubtask, raw: str, where: str) -> int | float:
    if sub.labels is None:
        try:
            score = float(raw)
        except ValueError:
            score = math.nan
        if not 0.0 <= score <= 5.0:
            raise HarnessError(f"{where}: {sub.name} score {raw!r} is not a number from 0 to 5")
        return score
    if raw not in sub.labels:
        raise HarnessError(f"{where}: {sub.name} label {raw!r} is not one of {', '.join(sub.labels)}")
    return sub.labels.index(raw)


def local_split(sub: GlueSubtask, split: Literal["train", "dev"]) -> datasets.Dataset:
    """One vendored split as a `datasets.Dataset` with columns text_a, [text_b,] label."""
    path = DATA_DIR / sub.folder / f"{split}.tsv"
    rows = read_tsv(path, sub.columns, sub.header)
    idx = [sub.columns.index(c) for c in sub.text_columns]
    label_at = sub.columns.index(sub.label_column)
    data: dict[str, list] = {name: [row[i] for _, row in rows] for name, i in zip(("text_a", "text_b"), idx)}
    data["label"] = [parse_label(sub, row[label_at], f"{path}:{line}") for line, row in rows]
    return _to_dataset(data)


def hub_split(sub: GlueSubtask, split: Literal["train", "dev"]) -> datasets.Dataset:
    """nyu-mll/glue via `datasets.load_dataset` (dev = its `validation` split)."""
    import datasets

    try:
        ds = datasets.load_dataset(HUB_DATASET, sub.name, split="train" if split == "train" else "validation")
    except Exception as e:  # offline, no cache, hub errors: all end the same way for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HarnessError(f"glue.source=hub: cannot load {HUB_DATASET}/{sub.name} ({first}); "
                           f"use glue.source=local (offline) or connect to the Hugging Face hub") from e
    names = sub.hub_text_columns or sub.text_columns
    data = {name: list(ds[col]) for name, col in zip(("text_a", "text_b"), names)}
    data["label"] = [float(v) for v in ds["label"]] if sub.labels is None else [int(v) for v in ds["label"]]
    return _to_dataset(data)


def _to_dataset(data: dict[str, list]) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict(data)


@lru_cache(maxsize=16)
def load_split(name: str, split: Literal["train", "dev"], source: str = "local") -> datasets.Dataset:
    sub = subtask(name)
    return hub_split(sub, split) if source == "hub" else local_split(sub, split)


def seeded_subset(ds: datasets.Dataset, n: int | None, seed: int, keep_order: bool) -> datasets.Dataset:
    """At most n rows drawn without replacement by `seed` (files are sorted by source/genre, so a
    prefix would be biased); keep_order keeps the file order of the rows drawn."""
    if n is None or n >= len(ds):
        return ds
    picked = np.random.default_rng(seed).permutation(len(ds))[:n]
    return ds.select(sorted(picked.tolist()) if keep_order else picked.tolist())


# -- metrics -------------------------------------------------------------------------------------


def _correlation(fn: Callable, preds: np.ndarray, labels: np.ndarray) -> float:
    """scipy's correlation; 0.0 when either side is constant (no association can be measured)."""
    if np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(fn(preds, labels)[0])


def compute_metric(name: str, preds: np.ndarray, labels: np.ndarray) -> float:
    """One GLUE metric; preds are class ids (or scores for stsb)."""
    from scipy import stats
    from sklearn import metrics as skm

    if name == "accuracy":
        return float(skm.accuracy_score(labels, preds))
    if name == "f1":
        return float(skm.f1_score(labels, preds, pos_label=1, zero_division=0.0))
    if name == "matthews_correlation":
        return float(skm.matthews_corrcoef(labels, preds))
    if name == "pearson":
        return _correlation(stats.pearsonr, preds, labels)
    if name == "spearmanr":
        return _correlation(stats.spearmanr, preds, labels)
    raise UnknownNameError(f"unknown GLUE metric '{name}'; known: accuracy, f1, matthews_correlation, "
                           "pearson, spearmanr")


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    stderr: float  # standard deviation of the bootstrap distribution


def bootstrap(name: str, preds: np.ndarray, labels: np.ndarray, resamples: int, seed: int) -> Interval | None:
    """Percentile 95% interval of the metric over `resamples` resamples of the examples (Efron &
    Tibshirani 1993). The resamples depend only on (seed, n), so two models are resampled alike."""
    if resamples <= 0 or len(labels) < 2:
        return None
    rows = np.random.default_rng(seed).integers(0, len(labels), size=(resamples, len(labels)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples (one class) warn in sklearn/scipy
        values = np.array([compute_metric(name, preds[r], labels[r]) for r in rows])
    low, high = np.percentile(values, [2.5, 97.5])
    return Interval(float(low), float(high), float(values.std(ddof=1)))


# -- fine-tuning ---------------------------------------------------------------------------------


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean-squared error for one output (regression, STS-B), else cross-entropy."""
    if logits.size(-1) == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def make_optimizer(module: torch.nn.Module, cfg: GlueConfig, steps: int):
    """AdamW with decay on matrices only, and the linear warmup / linear decay schedule."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = _adamw(groups, cfg.lr)
    warmup = int(cfg.warmup_ratio * steps)

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, scale)


def _adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """The fused AdamW kernel where torch has one for these parameters (about 5x faster on CPU)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, fused=True)
    except RuntimeError:  # older torch, or a device / dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)


def _texts(batch: dict[str, list]) -> tuple[list[str], list[str] | None]:
    return batch["text_a"], batch.get("text_b")


def _label_tensor(values: list, regression: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32 if regression else torch.long, device=device)


def train_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Row indices of every training step: a seeded permutation per epoch, cut into batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).tolist()
        out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return out


def finetune(model: ModelAdapter, sub: GlueSubtask, train: datasets.Dataset, cfg: GlueConfig,
             ctx: RunContext) -> tuple[torch.nn.Module, dict[str, float]]:
    """A fresh classifier fine-tuned on `train`; returns it with a few training statistics."""
    # Reseed, so that init and dropout draws are reproducible; they coincide across implementations
    # only where both build their modules and apply dropout in the same order (ours and HF's BERT do).
    torch.manual_seed(ctx.seed)
    module = model.classifier(sub.num_labels, seed=ctx.seed)
    batches = train_batches(len(train), cfg.batch_size, cfg.epochs, ctx.seed)
    opt, schedule = make_optimizer(module, cfg, len(batches))
    max_len = min(cfg.max_seq_len, model.max_length)
    module.train()
    losses = []
    steps = ctx.track(enumerate(batches, 1), total=len(batches), description=f"glue {sub.name} train {model.name}")
    for step, rows in steps:
        batch = train[rows]
        logits = module(**model.encode_pairs(*_texts(batch), max_len))
        loss = loss_fn(logits, _label_tensor(batch["label"], sub.labels is None, logits.device))
        if not torch.isfinite(loss):
            raise HarnessError(f"glue {sub.name}: training loss is {loss.item()} at step {step} of {len(batches)} "
                               f"({model.name}); lower glue.lr (now {cfg.lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 10):]
    return module, {"steps": len(batches), "final_train_loss": float(np.mean(tail)) if losses else math.nan}


@torch.no_grad()
def predict(model: ModelAdapter, module: torch.nn.Module, sub: GlueSubtask, ds: datasets.Dataset,
            cfg: GlueConfig, ctx: RunContext) -> np.ndarray:
    """Class ids (or scores, for regression) for every row of ds."""
    module.eval()
    max_len = min(cfg.max_seq_len, model.max_length)
    starts = range(0, len(ds), cfg.eval_batch_size)
    out = []
    for start in ctx.track(starts, total=len(starts), description=f"glue {sub.name} eval {model.name}"):
        batch = ds[start : start + cfg.eval_batch_size]
        logits = module(**model.encode_pairs(*_texts(batch), max_len)).float().cpu()
        out.append(logits.squeeze(-1) if sub.labels is None else logits.argmax(-1))
    return torch.cat(out).numpy()


# -- the task ------------------------------------------------------------------------------------

_SCORE = MetricSpec(higher_is_better=True)  # pair and gate slack come from the bootstrap stderr


class Glue(Task):
    name = "glue"
    version = "1.0"
    description = "GLUE dev scores after fine-tuning (sst2 cola mrpc rte stsb wnli qnli), with bootstrap CIs"
    config_class = GlueConfig
    needs = frozenset({Capability.CLASSIFY})
    metrics = {
        **{m: _SCORE for m in ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")},
        # wall-clock time on shared machines: reported, compared loosely (2x) and never a pair failure
        "train_seconds": MetricSpec(higher_is_better=False, pair_rtol=1.0, gate_rtol=1.0),
    }

    def __init__(self, config: GlueConfig) -> None:
        super().__init__(config)
        for name in config.subtasks:
            subtask(name)  # fail on a typo before any model is loaded
        if not config.subtasks:
            raise HarnessError(f"glue.subtasks is empty; choose from {', '.join(sorted(SUBTASKS))}")

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        for name in ctx.subtasks(self.config.subtasks):  # --resume redoes only the subtask a kill cut short
            sub = subtask(name)
            if not sub.has_local_train and self.config.source == "local":
                note = "its train split is not vendored (tasks/data/README.md); use --set glue.source=hub"
                warnings.warn(f"glue: skipping {name}: {note}", stacklevel=2)
                continue
            yield from self.run_subtask(model, sub, ctx)

    def splits(self, sub: GlueSubtask, ctx: RunContext) -> tuple[datasets.Dataset, datasets.Dataset]:
        cap = lambda n: ctx.limit if n is None else (n if ctx.limit is None else min(n, ctx.limit))
        train = load_split(sub.name, "train", self.config.source)
        dev = load_split(sub.name, "dev", self.config.source)
        return (seeded_subset(train, cap(self.config.max_train_examples), ctx.seed, keep_order=False),
                seeded_subset(dev, cap(self.config.max_eval_examples), ctx.seed, keep_order=True))

    def run_subtask(self, model: ModelAdapter, sub: GlueSubtask, ctx: RunContext) -> Iterator[Metric]:
        train, dev = self.splits(sub, ctx)
        start = time.perf_counter()
        module, stats = finetune(model, sub, train, self.config, ctx)
        seconds = time.perf_counter() - start
        preds = predict(model, module, sub, dev, self.config, ctx)
        labels = np.asarray(dev["label"])
        info = {"n_train": len(train), **stats, **_baseline(sub, train, labels)}
        for metric in sub.metrics:
            yield self.score(metric, sub, preds, labels, ctx.seed, info)
        yield self.metric("train_seconds", seconds, subtask=sub.name, n=len(train), extra=info)

    def score(self, metric: str, sub: GlueSubtask, preds: np.ndarray, labels: np.ndarray, seed: int,
              info: dict) -> Metric:
        value = compute_metric(metric, preds, labels)
        ci = bootstrap(metric, preds, labels, self.config.bootstrap, seed)
        extra = {**info, "ci_low": ci.low, "ci_high": ci.high, "ci_level": 0.95} if ci else dict(info)
        return self.metric(metric, value, subtask=sub.name, n=len(labels),
                           stderr=ci.stderr if ci else None, extra=extra)

    @staticmethod
    def variant(config: dict) -> str:
        return variant(config)

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        return glue_table(history, fig_dir, report_dir)


def _baseline(sub: GlueSubtask, train: datasets.Dataset, dev_labels: np.ndarray) -> dict[str, float]:
    """Dev accuracy of always predicting the training majority class: what "chance" means here."""
    if sub.labels is None:
        return {}
    majority = int(np.bincount(np.asarray(train["label"]), minlength=sub.num_labels).argmax())
    return {"majority_accuracy": float(np.mean(dev_labels == majority))}


# -- report --------------------------------------------------------------------------------------

# GLUE *test* set scores (GLUE server), Devlin et al. 2019, Table 1, in the metric that table uses
# for the task (MRPC: F1, STS-B: Spearman, CoLA: Matthews, others: accuracy). WNLI is excluded there.
PUBLISHED_TEST: dict[tuple[str, str], tuple[float, float]] = {  # (BERT-base, OpenAI GPT)
    ("sst2", "accuracy"): (93.5, 91.3),
    ("cola", "matthews_correlation"): (52.1, 45.4),
    ("mrpc", "f1"): (88.9, 82.3),
    ("stsb", "spearmanr"): (85.8, 80.0),
    ("rte", "accuracy"): (66.4, 56.0),
    ("qnli", "accuracy"): (90.5, 87.4),
}

# GLUE *dev* scores of MiniLM-L6xH384 (22M parameters, distilled with a teacher assistant), fine-tuned
# on the full training sets, averaged over 4 runs: Wang et al. 2020 (arXiv:2002.10957), Table 8 (also
# in microsoft/unilm minilm/README.md). The paper calls every GLUE score "accuracy"; its CoLA column
# can only be Matthews correlation (47.5 is below CoLA's majority-class accuracy), so it is filed as that.
PUBLISHED_MINILM_DEV: dict[tuple[str, str], float] = {
    ("sst2", "accuracy"): 91.5,
    ("cola", "matthews_correlation"): 47.5,
    ("mrpc", "accuracy"): 88.9,
    ("rte", "accuracy"): 68.8,
    ("qnli", "accuracy"): 90.5,
}

_REPORT_NOTES = """
Scores x 100 on the GLUE **dev** sets (or the seeded subset the budget names), with bootstrap 95%
intervals. Published columns: BERT-base and OpenAI GPT are GLUE **test** scores (Devlin et al.
2019, Table 1), MiniLM-L6xH384 is a **dev** score (Wang et al. 2020, Table 8); all three fine-tuned
bigger models on the full training sets, with per-task hyperparameter searches. They set the
scale; the `minilm` weights here are all-MiniLM-L6-v2, a 6-layer sentence-embedding fine-tune of
MiniLM-L6-H384, so no published row is a like-for-like target (docs/glue.md). A scratch model and
its reference share data, order, head init and, for our BERT, dropout masks: read any gap
against the intervals.
"""


def variant(config: dict) -> str:
    """"full train and dev sets", or the example budget ("3,000 train / 500 dev examples")."""
    limit = config.get("limit")

    def size(key: str) -> int | None:
        n = config.get(key)
        return limit if n is None else (n if limit is None else min(n, limit))

    train, dev = size("max_train_examples"), size("max_eval_examples")
    if train is None and dev is None:
        return "full train and dev sets"
    count = lambda n: "all" if n is None else f"{n:,}"  # noqa: E731
    return f"{count(train)} train / {count(dev)} dev examples"


def glue_table(history: pd.DataFrame, fig_dir: Path | None = None, report_dir: Path | None = None) -> str:
    """Markdown per budget: subtask x metric rows, one column per (model, weights), published beside."""
    from harness.api import latest

    history = history.assign(variant=[variant(c) if isinstance(c, dict) else "" for c in history["config"]])
    rows = latest(history, ("model", "weights", "variant", "task", "subtask", "metric"))
    parts = []
    for name, block in sorted(rows.groupby("variant"), key=lambda kv: kv[0] != "full train and dev sets"):
        scores = block[block["metric"] != "train_seconds"]
        if scores.empty:
            continue
        parts += [_summary(name, scores), _recipe_table(block)]
        plot = _summary_plot(name, scores, fig_dir) if fig_dir is not None else None
        if plot is not None:
            link = plot.relative_to(report_dir) if report_dir is not None else plot
            parts.append(f"![GLUE {name}]({link.as_posix()})\n")
    return "\n".join(parts + [_REPORT_NOTES]) if parts else ""


def _columns(scores: pd.DataFrame) -> list[tuple[str, str]]:
    return sorted(set(zip(scores["model"], scores["weights"])))


def _summary(name: str, scores: pd.DataFrame) -> str:
    columns = _columns(scores)
    head = [f"{m} (`{w}`)" for m, w in columns]
    head += ["majority class", "BERT-base (test)", "OpenAI GPT (test)", "MiniLM-L6xH384 (dev)"]
    lines = [f"### GLUE summary: {name}", "", "| subtask | metric | " + " | ".join(head) + " |",
             "|---|---|" + "---|" * len(head)]
    for (sub, metric), block in scores.groupby(["subtask", "metric"], sort=True):
        cells = [ci_cell(block[(block["model"] == m) & (block["weights"] == w)]) for m, w in columns]
        majority = next((e["majority_accuracy"] for e in block["extra"] if "majority_accuracy" in e), None)
        cells.append(f"{100 * majority:.1f}" if majority is not None and metric == "accuracy" else "-")
        published = PUBLISHED_TEST.get((sub, metric))
        cells += [f"{v:.1f}" for v in published] if published else ["-", "-"]
        minilm = PUBLISHED_MINILM_DEV.get((sub, metric))
        cells.append("-" if minilm is None else f"{minilm:.1f}")
        lines.append(f"| {sub} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _recipe_table(block: pd.DataFrame) -> str:
    """What each subtask was trained with, and how long it took, per model."""
    timing = block[block["metric"] == "train_seconds"]
    lines = ["| model | weights | subtask | train examples | epochs | lr | batch | max_seq_len | steps "
             "| final train loss | train seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, row in timing.sort_values(["model", "weights", "subtask"]).iterrows():
        cfg, extra = row["config"], row["extra"] if isinstance(row["extra"], dict) else {}
        loss = extra.get("final_train_loss")
        lines.append(f"| {row['model']} | `{row['weights']}` | {row['subtask']} | {int(row['n']):,} "
                     f"| {cfg.get('epochs')} | {cfg.get('lr'):g} | {cfg.get('batch_size')} | {cfg.get('max_seq_len')} "
                     f"| {extra.get('steps', '-')} | {'-' if loss is None else f'{loss:.4f}'} "
                     f"| {row['value']:.1f} |")
    return "\n".join(lines) + "\n"


def _summary_plot(name: str, scores: pd.DataFrame, fig_dir: Path) -> Path | None:
    """Grouped bars per subtask/metric: every model, then the published numbers where they exist."""
    import matplotlib.pyplot as plt

    keys = sorted(set(zip(scores["subtask"], scores["metric"])))
    series = {f"{m} ({w})": {(r["subtask"], r["metric"]): 100 * r["value"]
                             for _, r in scores[(scores["model"] == m) & (scores["weights"] == w)].iterrows()}
              for m, w in _columns(scores)}
    series["BERT-base (test)"] = {k: v[0] for k, v in PUBLISHED_TEST.items()}
    series["MiniLM-L6xH384 (dev)"] = dict(PUBLISHED_MINILM_DEV)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(keys)) + 2.0, 3.4))
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, k in enumerate(keys) if k in values]
        ax.bar(xs, [values[k] for k in keys if k in values], width, label=label)
    ax.set_xticks(range(len(keys)), [f"{s}\n{m}" for s, m in keys], fontsize=7)
    ax.set_ylabel("dev score x 100")
    ax.set_title(f"GLUE: {name}", fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / ("glue_summary_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TASKS.add(Glue.name, Glue.description, Glue)
