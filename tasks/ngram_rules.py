"""Task `ngram-rules`: how much context can each rung of the ladder learn to use?

For every rule order N in `ngram-rules.n` (subtask `n=N`) the task draws a rule language
(tasks/ngram_rules_lang.py: every symbol after the first N-1 is uniform over an allowed set fixed
by the previous N-1 symbols, and nothing can be predicted from fewer), trains a fresh model of
the ladder (harness/models/charlm.py) on K = `train_samples` sequences, then reports

- `valid_rate`:       share of M = `samples` sequences sampled from the model (temperature
                      `temperature`) in which every symbol obeys the rule;
- `token_valid_rate`: share of the constrained symbols (positions >= N-1) that obey it;
- `nll`:              nats per next-token target on `eval_samples` held-out sequences, next to
- `entropy_bound`:    the language's exact entropy rate on the same targets (the best any model
                      can do); `extra.short_context_nll` is the best a model one symbol short of
                      N-1 symbols of context can do;
- `train_seconds`:    wall time of the training alone.

A model that sees fewer than N-1 symbols cannot beat `short_context_nll` (its constrained
symbols are coin flips among V), so its valid rate collapses to about (k/V)^(L-N+1).

Everything is derived from `--seed`: the rule table, the training and held-out sequences, the
model's initial weights, the batch order and the sampling. Seeds do not depend on the model,
so char-gpt-scratch and char-gpt-hf train from the same init on the same batches.
With `seeds` = S > 1 each order is run for seeds --seed .. --seed+S-1 and every row holds the mean
over them (`stderr` across seeds, a 95% Student-t interval in `extra.ci_low` / `extra.ci_high`, each
seed's value in `extra.per_seed`); the subtask stays `n=N`.
The `valid_rate` row's `extra.internals` holds what the report draws: the bigram's probability
table, the MLP's embeddings and hidden states projected on two principal components, and the
transformer's attention maps on one held-out sequence.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from scipy.stats import t as scipy_t

from harness.api import (
    TASKS,
    Capability,
    HarnessError,
    Ladder,
    Metric,
    MetricSpec,
    ModelAdapter,
    Recipe,
    RunContext,
    Task,
    torch_threads,
)
from reproductions import charlm
from tasks.common import LADDER_ORDER, ladder_refusal
from tasks.ngram_rules_lang import TASK_VERSION, RuleLanguage, RuleSpec


@dataclass(frozen=True)
class NGramRulesConfig:
    n: tuple[int, ...] = (2, 3, 4, 6)  # rule orders N, one subtask each
    train_samples: int = 2000  # K training sequences per N
    samples: int = 500  # M sequences sampled from each trained model
    eval_samples: int = 500  # held-out sequences scored for nll
    steps: int = 1000  # optimiser steps of the neural models (counts read the data once)
    batch_size: int = 32
    lr: float = 3e-3  # AdamW
    seq_len: int = 32  # L, symbols per sequence
    vocab: int = 4  # V
    allowed: int = 2  # k, size of each allowed set
    temperature: float = 1.0  # sampling temperature
    threads: int = 1  # torch intra-op threads while training and sampling (0: leave torch's setting)
    seeds: int = 1  # replicates per N: seeds --seed, --seed+1, ...; rows hold the mean and a t-interval


def derive_seed(seed: int, *parts: object) -> int:
    """A stable seed for one purpose (crc32 of the parts; Python's hash() changes per process)."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


MAX_WINDOWS = 1024  # the MLP picture projects every window of symbols up to this many


class NGramRules(Task):
    name = "ngram-rules"
    version = f"{TASK_VERSION}.0"
    description = ("synthetic rule languages that need exactly N symbols of context: train each model "
                   "of the ladder, sample, count rule-abiding sequences; nll next to the entropy bound")
    config_class = NGramRulesConfig
    needs = frozenset({Capability.LADDER})
    metrics = {
        # A pair shares init and batches but not rounding: training amplifies 1e-7 differences, most of
        # all when a model leaves its plateau (docs/ngram_rules.md), hence tolerances, not equality.
        "valid_rate": MetricSpec(higher_is_better=True, pair_atol=0.05, gate_atol=0.05),
        "token_valid_rate": MetricSpec(higher_is_better=True, pair_atol=0.01, gate_atol=0.01),
        "nll": MetricSpec(higher_is_better=False, pair_atol=0.02, gate_atol=0.02),
        "entropy_bound": MetricSpec(higher_is_better=None, pair_atol=1e-12, gate_atol=1e-12),
        "train_seconds": MetricSpec(higher_is_better=None, pair_atol=math.inf, gate_atol=math.inf),  # not compared
    }

    def refusal(self, model: ModelAdapter, capability: Capability) -> str:
        return ladder_refusal(self.name, model.name)

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        orders = ctx.subtasks(self.config.n, key=lambda n: f"n={n}")  # --resume skips the orders already finished
        for n in ctx.track(orders, total=len(self.config.n), description=f"{self.name} {model.name}"):
            with torch_threads(self.config.threads):
                seeds = [ctx.seed + r for r in range(self.config.seeds)]
                runs = [list(self.run_order(model.require(Ladder, self.name), n, s)) for s in seeds]
            yield from combine_seeds(runs, seeds)

    def validate(self) -> None:
        if self.config.seeds < 1:
            raise HarnessError(f"{self.name}.seeds must be >= 1 (got {self.config.seeds}); "
                               f"e.g. --set {self.name}.seeds=3")
        for n in self.config.n:
            self.language(n, 0)  # a bad order or alphabet is refused before any model is built

    def language(self, n: int, seed: int) -> RuleLanguage:
        c = self.config
        try:
            return RuleLanguage(RuleSpec(n, c.vocab, c.allowed, c.seq_len, seed=derive_seed(seed, "rules", n)))
        except ValueError as e:
            raise HarnessError(f"{self.name} n={n}: {e}") from e

    def run_order(self, model: Ladder, n: int, seed: int) -> Iterator[Metric]:
        c, lang = self.config, self.language(n, seed)
        train = lang.sample(c.train_samples, derive_seed(seed, "train", n))
        held = lang.sample(c.eval_samples, derive_seed(seed, "held-out", n))
        lm = model.new_lm(c.vocab, c.seq_len, derive_seed(seed, "init", n))
        recipe = Recipe(c.steps, c.batch_size, c.seq_len, c.lr, derive_seed(seed, "batches", n))
        start = time.perf_counter()
        losses = model.train(lm, train, recipe)
        seconds = time.perf_counter() - start
        gen = torch.Generator(device=model.device).manual_seed(derive_seed(seed, "sample", n))
        sampled = lm.sample(c.samples, c.seq_len, generator=gen, temperature=c.temperature).cpu()
        yield from self.score(n, lang, lm, sampled, held, losses, seconds)

    def score(self, n: int, lang: RuleLanguage, lm: charlm.CharLM, sampled: torch.Tensor, held: torch.Tensor,
              losses: list[float], seconds: float) -> Iterator[Metric]:
        sub, ok = f"n={n}", lang.token_valid(sampled)
        bound, targets = lang.entropy_bound(), held.shape[0] * (held.shape[1] - 1)
        info = {"short_context_nll": lang.expected_nll(n - 2), "rule_seed": lang.spec.seed,
                "final_train_loss": losses[-1] if losses else None}
        yield self.metric("valid_rate", ok.all(dim=1).double().mean(), subtask=sub, n=len(sampled),
                          extra={**info, "internals": internals(lm, lang, held[:1])})
        yield self.metric("token_valid_rate", ok[:, n - 1:].double().mean(), subtask=sub,
                          n=ok[:, n - 1:].numel(), extra=info)
        yield self.metric("nll", lm.nll(held.to(_device(lm))), subtask=sub, n=targets,
                          extra={**info, "loss_curve": _thin(losses)})
        yield self.metric("entropy_bound", bound, subtask=sub, n=targets, extra=info)
        yield self.metric("train_seconds", seconds, subtask=sub, extra=info)

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        return ngram_rules_section(history, Path(fig_dir), Path(report_dir))


def combine_seeds(runs: list[list[Metric]], seeds: list[int]) -> Iterator[Metric]:
    """One row per metric from the runs of several seeds (same order of rows in each run): the mean,
    its standard error across seeds and a 95% Student-t interval over seeds (`extra.ci_low/ci_high`,
    clipped to [0, 1] for rates), with every seed's value in `extra.per_seed`. The first seed's
    internals and loss curve are kept (the report draws one model, not an average of them)."""
    for rows in zip(*runs):
        first, values = rows[0], [r.value for r in rows]
        mean = sum(values) / len(values)
        extra = {**first.extra, "seeds": seeds, "per_seed": values}
        stderr = None
        if len(values) > 1:
            stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
            half = float(scipy_t.ppf(0.975, len(values) - 1)) * stderr
            low, high = mean - half, mean + half
            if first.metric in RATES:
                low, high = max(0.0, low), min(1.0, high)
            extra.update(ci_low=low, ci_high=high, ci_level=0.95)
            for key in PER_SEED_INFO:  # what differs between seeds, listed in seed order
                extra[key] = [r.extra.get(key) for r in rows]
        n = sum(r.n for r in rows) if all(r.n is not None for r in rows) else None
        yield Metric(first.metric, mean, first.higher_is_better, subtask=first.subtask, n=n, stderr=stderr,
                     extra=extra)


RATES = frozenset({"valid_rate", "token_valid_rate"})
PER_SEED_INFO = ("rule_seed", "final_train_loss")


def _device(lm: torch.nn.Module) -> torch.device:
    tensors = [*lm.parameters(), *lm.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")


def _thin(losses: list[float], points: int = 100) -> dict[str, list[float]]:
    """At most `points` (step, loss) pairs, evenly spaced, the last step included."""
    if not losses:
        return {"step": [], "loss": []}
    every = max(1, math.ceil(len(losses) / points))
    steps = sorted({*range(0, len(losses), every), len(losses) - 1})
    return {"step": steps, "loss": [round(losses[s], 5) for s in steps]}


# ---- model internals, for the report's pictures ----------------------------------------------------
@torch.no_grad()
def internals(lm: charlm.CharLM, lang: RuleLanguage, probe: torch.Tensor) -> dict:
    """Small JSON-able pictures of what `lm` learned (empty for models without one)."""
    if isinstance(lm, charlm.NGramCounts):
        return counts_internals(lm, lang)
    if isinstance(lm, charlm.NeuralNGram):
        return mlp_internals(lm, lang)
    maps = lm.attention_maps(probe.to(_device(lm)))  # (layer, B, head, T, T), None without attention
    if maps is not None:
        return {"kind": "attention", "tokens": probe[0].tolist(), "maps": _round(maps[:, 0].cpu(), 3)}
    return {}


def counts_internals(lm: charlm.NGramCounts, lang: RuleLanguage) -> dict:
    """P(next | last order-1 symbols) and, when the rule has the same order, the rule's table."""
    probs = lm.log_probs(lm.config.order - 1).exp()  # (V**(order-1), V)
    rule = lang.table.int().tolist() if lang.spec.n == lm.config.order else None
    return {"kind": "counts", "order": lm.config.order, "probs": _round(probs, 4), "rule": rule}


def mlp_internals(lm: charlm.NeuralNGram, lang: RuleLanguage) -> dict:
    """Embeddings C (V symbols + the padding row) and the hidden layer on every full window, each
    projected on its first two principal components; windows are labelled by their allowed set
    when the window covers the rule's N-1 symbols."""
    v, width = lm.vocab, lm.config.context
    if v**width > MAX_WINDOWS:  # e.g. the `small` size's 8-symbol window: 65,536 of them
        return {"kind": "mlp", "context": width, "embedding_pca": _round(pca2(lm.C.weight.cpu()), 4)}
    windows = torch.cartesian_prod(*[torch.arange(v)] * width).reshape(-1, width)  # (V**width, width)
    hidden = torch.tanh(lm.H(lm.C(windows.to(_device(lm))).reshape(len(windows), -1))).cpu()  # (V**width, h)
    need = lang.spec.n - 1  # >= 1
    labels = ["".join(map(str, sorted(lang.allowed(w[width - need:])))) if need <= width else "?" for w in windows]
    return {"kind": "mlp", "context": width, "embedding_pca": _round(pca2(lm.C.weight.cpu()), 4),
            "hidden_pca": _round(pca2(hidden), 4), "windows": windows.tolist(), "labels": labels}


def pca2(x: torch.Tensor) -> torch.Tensor:
    """Rows of x projected on their first two principal components (signs fixed: largest |coord| > 0)."""
    centred = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ vh[:2].T  # (rows, 2)
    signs = torch.sign(coords.gather(0, coords.abs().argmax(0, keepdim=True)))
    return coords * torch.where(signs == 0, 1.0, signs)


def _round(t: torch.Tensor, digits: int) -> list:
    return torch.round(t.double(), decimals=digits).tolist()


# ---- report -------------------------------------------------------------------------------------
SOLVED = 0.5  # valid rate at which the summary counts an order as learned


def ngram_rules_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
    """Markdown: models x N tables, valid rate against N, training curves and model internals,
    each picture followed by a short reading (numbers in it are computed from the rows)."""
    from harness.api import latest

    rows = latest(history)
    if rows.empty:
        return ""
    one_weights = rows["weights"].nunique() == 1
    rows = rows.assign(label=rows["model"] if one_weights else rows["model"] + " (" + rows["weights"] + ")",
                       order=rows["subtask"].map(_order))
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = ["### Valid rate (share of sampled sequences that obey the rule everywhere)", "",
             _table(rows, "valid_rate"), "", "### Held-out nll (nats per token) and the bounds", "",
             _nll_table(rows), "", summary_reading(rows), ""]
    for name, picture in (("by_order", plot_by_order), ("curves", plot_curves), ("bigram", plot_bigram),
                          ("mlp", plot_mlp), ("attention", plot_attention)):
        drawn = picture(rows, fig_dir / f"ngram_rules_{name}.png")
        if drawn is not None:
            path, reading = drawn
            parts += [f"![ngram-rules {name}]({_rel(path, report_dir)})", "", reading, ""]
    return "\n".join(parts)


def summary_reading(rows: pd.DataFrame) -> str:
    valid = _metric(rows, "valid_rate")
    solved = []
    for label in [lab for lab in _labels(rows) if lab in valid.index]:
        orders = [n for n, v in valid.loc[label].dropna().items() if v >= SOLVED]
        solved.append(f"{label} N <= {max(orders)}" if orders else f"{label} none")
    return ("**Reading.** A model that sees fewer than N-1 previous symbols cannot beat the last row "
            "(log V: the balanced rule makes every shorter context uninformative), so its constrained "
            f"symbols are coin flips and its valid rate is about (k/V)^(L-N+1), i.e. 0. Orders learned "
            f"(valid rate >= {SOLVED}): {'; '.join(solved)}. By construction a counting model cannot pass "
            "its order and the MLP its window (context + 1 symbols); recurrent and attention models have "
            "no such limit and are held back by optimisation alone: see the training curves.")


def _order(subtask: str) -> int:
    return int(subtask[2:]) if subtask.startswith("n=") and subtask[2:].isdigit() else -1


def _rel(path: Path, report_dir: Path) -> str:
    return (path.relative_to(report_dir) if path.is_relative_to(report_dir) else path).as_posix()


def _labels(rows: pd.DataFrame) -> list[str]:
    """Row labels in ladder order (bigram first, the transformers last)."""
    ladder = list(LADDER_ORDER)
    model_of = rows.drop_duplicates("label").set_index("label")["model"]
    rank = {label: ladder.index(m) if m in ladder else len(ladder) for label, m in model_of.items()}
    return sorted(model_of.index, key=lambda label: (rank[label], label))


def _metric(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """label x N values of one metric."""
    block = rows[rows["metric"] == metric]
    return block.pivot_table(index="label", columns="order", values="value", aggfunc="last")


def _bounds(rows: pd.DataFrame, metric: str, side: str) -> pd.DataFrame:
    """label x N of `extra.ci_low` or `extra.ci_high` (NaN for single-seed rows)."""
    block = rows[rows["metric"] == metric]
    block = block.assign(bound=block["extra"].map(lambda e: e.get(side) if isinstance(e, dict) else None))
    return block.pivot_table(index="label", columns="order", values="bound", aggfunc="last", dropna=False)


def _table(rows: pd.DataFrame, metric: str) -> str:
    """Markdown label x N; cells of multi-seed rows read `mean [ci_low, ci_high]`."""
    values, low, high = _metric(rows, metric), _bounds(rows, metric, "ci_low"), _bounds(rows, metric, "ci_high")
    orders = sorted(values.columns)

    def cell(label: str, n: int) -> str:
        lo = low.loc[label].get(n) if label in low.index and n in low.columns else None
        hi = high.loc[label].get(n) if label in high.index and n in high.columns else None
        ci = "" if lo is None or hi is None or math.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]"
        return _fmt(values.loc[label].get(n)) + ci

    lines = ["| model | " + " | ".join(f"N={n}" for n in orders) + " |", "|---|" + "---|" * len(orders)]
    for label in [lab for lab in _labels(rows) if lab in values.index]:
        lines.append(f"| {label} | " + " | ".join(cell(label, n) for n in orders) + " |")
    return "\n".join(lines)


def _nll_table(rows: pd.DataFrame) -> str:
    bounds = rows[rows["metric"] == "entropy_bound"].groupby("order")
    bound = bounds["value"].last()
    short = bounds["extra"].last().map(lambda e: e.get("short_context_nll"))
    orders = sorted(_metric(rows, "nll").columns)
    return "\n".join([_table(rows, "nll"),
                      "| *entropy bound* | " + " | ".join(_fmt(bound.get(n)) for n in orders) + " |",
                      "| *best with N-2 symbols* | " + " | ".join(_fmt(short.get(n)) for n in orders) + " |"])


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _internals(rows: pd.DataFrame, model: str) -> dict[int, dict]:
    """N -> the `internals` dict of `model`'s valid_rate rows (orders without one are left out)."""
    block = rows[(rows["model"] == model) & (rows["metric"] == "valid_rate")].sort_values("order")
    found = {int(o): e.get("internals") for o, e in zip(block["order"], block["extra"]) if isinstance(e, dict)}
    return {n: info for n, info in found.items() if info}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


Drawn = tuple[Path, str] | None  # (figure, reading)


def plot_by_order(rows: pd.DataFrame, path: Path) -> Drawn:
    plt, labels = _plt(), _labels(rows)
    excess = _metric(rows, "nll").sub(_metric(rows, "entropy_bound").mean(), axis=1)
    panels = [("valid_rate", _metric(rows, "valid_rate")), ("token_valid_rate", _metric(rows, "token_valid_rate")),
              ("nll - entropy bound (nats)", excess)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    intervals = {metric: (_bounds(rows, metric, "ci_low"), _bounds(rows, metric, "ci_high")) for metric in RATES}
    for ax, (title, values) in zip(axes, panels):
        low, high = intervals.get(title, (None, None))
        for label in [lab for lab in labels if lab in values.index]:
            series = values.loc[label].dropna()
            line, = ax.plot(series.index, series.values, marker="o", label=label)
            if low is not None and label in low.index:
                lo, hi = low.loc[label].reindex(series.index), high.loc[label].reindex(series.index)
                ax.fill_between(series.index, lo.values.astype(float), hi.values.astype(float),
                                color=line.get_color(), alpha=0.15, lw=0)
        ax.set(title=title, xlabel="rule order N", xticks=sorted(values.columns))
    axes[0].legend(fontsize=7)
    seeds = {len(e.get("seeds", [0])) for e in rows["extra"] if isinstance(e, dict)}
    band = (f" Shaded: 95% Student-t interval over {max(seeds)} seeds (rule table, data, init and sampling "
            "all change with the seed); lines: the mean." if max(seeds, default=1) > 1 else "")
    return _save(fig, path), (
        "Valid rate, token valid rate and excess nll against the rule order N, one line per model. A model "
        "past its reach sits at token valid rate k/V and excess nll log V - entropy bound; the valid rate, "
        "which needs every constrained symbol right, falls before the token valid rate does." + band)


def plot_curves(rows: pd.DataFrame, path: Path) -> Drawn:
    block = rows[rows["metric"] == "nll"]
    curves = [(r["label"], r["order"], r["extra"].get("loss_curve") or {}) for _, r in block.iterrows()]
    curves = [c for c in curves if c[2].get("step")]
    if not curves:
        return None
    plt, orders = _plt(), sorted({o for _, o, _ in curves})
    bound = rows[rows["metric"] == "entropy_bound"].groupby("order")["value"].last()
    fig, axes = plt.subplots(1, len(orders), figsize=(3.4 * len(orders), 3.2), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], orders):
        for label in _labels(rows):
            for curve in [c for lab, o, c in curves if lab == label and o == n]:
                ax.plot(curve["step"], curve["loss"], label=label, lw=1)
        ax.axhline(bound.get(n, float("nan")), color="k", ls="--", lw=0.8, label="entropy bound")
        ax.set(title=f"N={n}: training loss", xlabel="step")
    axes[0][0].legend(fontsize=6)
    return _save(fig, path), (
        "Training loss of the neural models (dashed: the entropy bound). Learning is a plateau at log V "
        "followed by a drop, not a gradual descent: every context shorter than N-1 symbols is exactly "
        "uninformative, so there is no partial credit for finding some of the relevant symbols, as "
        "with sparse parities (Barak et al. 2022, \"Hidden Progress in Deep Learning\"). The plateau "
        "lengthens with N; a model still on it at the last step scores like a count model.")


def plot_bigram(rows: pd.DataFrame, path: Path) -> Drawn:
    found = _internals(rows, "bigram")
    if not found:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(found), figsize=(2.9 * len(found), 2.9), squeeze=False)
    for ax, (n, info) in zip(axes[0], found.items()):
        probs, rule = torch.tensor(info["probs"]), info.get("rule")
        ax.imshow(probs, vmin=0, vmax=1, cmap="viridis")
        for i, j in torch.cartesian_prod(*map(torch.arange, probs.shape)).tolist():
            mark = "*" if rule is not None and rule[i][j] else ""
            ax.text(j, i, f"{probs[i, j]:.2f}{mark}", ha="center", va="center", fontsize=7,
                    color="w" if probs[i, j] < 0.5 else "k")
        ax.set(title=f"bigram trained on N={n}", xlabel="next symbol", ylabel="previous symbol",
               xticks=range(probs.shape[1]), yticks=range(probs.shape[0]))
    return _save(fig, path), bigram_reading(found)


def bigram_reading(found: dict[int, dict]) -> str:
    parts = []
    for n, info in found.items():
        probs = torch.tensor(info["probs"])
        if info.get("rule") is not None:
            rule = torch.tensor(info["rule"], dtype=torch.double)
            gap = (probs - rule / rule.sum(-1, keepdim=True)).abs().max()
            parts.append(f"N={n}: the table is the rule itself (within {gap:.3f} of 1/k on the allowed "
                         "successors, marked *, and of 0 elsewhere)")
        else:
            parts.append(f"N={n}: flat, every entry within {(probs - 1 / probs.shape[1]).abs().max():.3f} of 1/V")
    return ("The bigram's P(next | previous), read off its counts. " + "; ".join(parts) + ". Above order 2 "
            "the previous symbol alone says nothing about the next one (by construction), so counting "
            "pairs can only learn the uniform law.")


def plot_mlp(rows: pd.DataFrame, path: Path) -> Drawn:
    found = _internals(rows, "mlp-ngram")
    usable = {n: info for n, info in found.items() if info.get("labels") and "?" not in info["labels"]}
    if not found:
        return None
    n, info = max(usable.items()) if usable else max(found.items())
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    emb = torch.tensor(info["embedding_pca"])
    axes[0].scatter(emb[:, 0], emb[:, 1], s=60)
    for i, (x, y) in enumerate(emb.tolist()):
        axes[0].annotate("pad" if i == len(emb) - 1 else str(i), (x, y), textcoords="offset points", xytext=(5, 5))
    axes[0].set(title=f"mlp-ngram trained on N={n}: embeddings C, PCA", xlabel="PC1", ylabel="PC2")
    if info.get("hidden_pca") is None:
        return _save(fig, path), "MLP embeddings; the window is too wide to draw every hidden state."
    hidden, windows = torch.tensor(info["hidden_pca"]), torch.tensor(info["windows"])
    _scatter_by(axes[1], hidden, [str(w[0]) for w in windows.tolist()], "oldest symbol in the window")
    _scatter_by(axes[2], hidden, ["{" + ",".join(lab) + "}" for lab in info["labels"]], "allowed next symbols")
    return _save(fig, path), mlp_reading(n, info, hidden, windows)


def _scatter_by(ax, coords: torch.Tensor, labels: list[str], title: str) -> None:
    for label in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        ax.scatter(coords[idx, 0], coords[idx, 1], s=18, label=label)
    ax.legend(fontsize=7, title=title, title_fontsize=7)
    ax.set(title=f"hidden tanh layer, all {len(labels)} windows, PCA", xlabel="PC1", ylabel="PC2")


def mlp_reading(n: int, info: dict, hidden: torch.Tensor, windows: torch.Tensor) -> str:
    width = windows.shape[1]
    shares = ", ".join(f"{_symbol(width - pos - 1)}: {_explained(hidden, windows[:, pos].tolist()):.0%}"
                       for pos in range(width))
    return (f"Left: the {len(info['embedding_pca']) - 1} symbol vectors and the padding vector of the MLP "
            f"trained on N={n}, on their first two principal components; the rule treats symbols as "
            "arbitrary labels, so (unlike Bengio et al.'s words) there is no similarity between them to "
            "find. Middle and right: the hidden layer on every window of symbols, on its first two "
            "principal components, coloured by one window symbol and by the allowed set. Share of the "
            f"variance in this plane explained by each window symbol ({shares}) and by the allowed set "
            f"({_explained(hidden, info['labels']):.0%}): the leading directions encode the window's "
            "symbols, and the output layer reads the allowed set off them (it is not a cluster in two "
            "dimensions).")


def _symbol(offset: int) -> str:
    return "symbol t" if offset == 0 else f"symbol t-{offset}"


def _explained(coords: torch.Tensor, labels: list) -> float:
    """Between-group share of the variance of `coords` (R^2 of a one-way grouping)."""
    total = ((coords - coords.mean(0)) ** 2).sum()
    within = sum(((coords[idx] - coords[idx].mean(0)) ** 2).sum()
                 for idx in ([i for i, lab in enumerate(labels) if lab == g] for g in set(labels)))
    return float(1 - within / total) if total > 0 else 0.0


def plot_attention(rows: pd.DataFrame, path: Path) -> Drawn:
    found = _internals(rows, "char-gpt-scratch")
    if not found:
        return None
    plt = _plt()
    maps = {n: torch.tensor(info["maps"]) for n, info in found.items()}  # (layer, head, T, T)
    layers, heads = next(iter(maps.values())).shape[:2]
    fig, axes = plt.subplots(len(maps), layers * heads, figsize=(2.6 * layers * heads, 2.6 * len(maps)),
                             squeeze=False)
    for row, (n, m) in enumerate(maps.items()):
        for col in range(layers * heads):
            ax = axes[row][col]
            ax.imshow(m[col // heads, col % heads], vmin=0, vmax=1, cmap="magma")
            ax.set_title(f"N={n} layer {col // heads} head {col % heads}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row][0].set_ylabel("query position")
    for ax in axes[-1]:
        ax.set_xlabel("key position")
    return _save(fig, path), attention_reading(maps)


def attention_reading(maps: dict[int, torch.Tensor]) -> str:
    """Which offset each head attends to most, averaged over query positions >= 8."""
    lines = []
    for n, m in maps.items():
        heads = []
        for layer in range(m.shape[0]):
            for head in range(m.shape[1]):
                offset, weight = _favourite_offset(m[layer, head])
                heads.append(f"L{layer}H{head} {_symbol(offset)[7:]} ({weight:.2f})")
        lines.append(f"N={n}: " + ", ".join(heads))
    return ("Attention of char-gpt-scratch on one held-out sequence (rows: rule order N; bright = weight "
            "near 1). The symbol at t is already in the residual stream, so a model of order N needs "
            "the N-2 symbols before it; a head that looks d positions back supplies symbol t-d. Favourite "
            "offset of each head (mean weight on it, query positions >= 8): " + "; ".join(lines) + ". "
            "Sharp bands at the needed offsets mean the transformer found the rule's window. At N=2 "
            "nothing has to be fetched, and attention stays diffuse although the model is right; at an "
            "order it has not learned, diffuse rows (or a column on the first position) mean it is still "
            "on the plateau.")


def _favourite_offset(attn: torch.Tensor, start: int = 8, max_offset: int = 8) -> tuple[int, float]:
    t_len = attn.shape[-1]
    means = [float(torch.stack([attn[t, t - d] for t in range(max(start, d), t_len)]).mean())
             for d in range(min(max_offset, t_len - 1) + 1)]
    best = max(range(len(means)), key=means.__getitem__)
    return best, means[best]


TASKS.add(NGramRules.name, NGramRules.description, NGramRules)
