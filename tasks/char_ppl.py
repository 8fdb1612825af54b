"""Task `char-ppl`: the ladder trained on Tiny Shakespeare characters, scored on held-out text.

Data: the vendored Tiny Shakespeare (tasks/data/tinyshakespeare/input.txt, Karpathy 2015,
"The Unreasonable Effectiveness of Recurrent Neural Networks"; 1,115,394 characters, 65 distinct).
The vocabulary is every character of the file (sorted); the first 90% by position is the
training stream and the last 10% the held-out stream, as in nanoGPT's `shakespeare_char`.

Scoring: the held-out stream is cut into windows of `seq_len` characters that overlap by one, so
every held-out character after the first is a next-token target exactly once, predicted from the
characters before it in its window (1 to seq_len-1 of them, the same for every model). Windows
that would run past the end are dropped. Metrics, over those targets:

- `val_loss`:       mean negative log-likelihood in nats per character;
- `bits_per_char`:  the same in bits (val_loss / ln 2);
- `train_loss`:     mean training loss over the last 10% of the steps (counts: their val_loss);
- `train_seconds`:  wall time of the training alone.

The seed fixes the initial weights, the batch order and the sample shown in `extra.sample`.
Budgets are small on purpose (a few hundred AdamW steps, see CharPplConfig); raise
`char-ppl.steps` for better numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

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
from tasks.ngram_rules import derive_seed


@dataclass(frozen=True)
class CharPplConfig:
    steps: int = 500  # AdamW steps of the neural models (counts read the training text once)
    batch_size: int = 32
    seq_len: int = 64  # training window and scoring window, in characters
    lr: float = 3e-3
    val_fraction: float = 0.1  # the last part of the text, by position, is held out
    eval_chars: int | None = None  # score only the first N held-out characters (None: all)
    file: str | None = None  # another UTF-8 text file instead of Tiny Shakespeare
    eval_batch_size: int = 256  # windows per forward pass when scoring
    threads: int = 1  # torch intra-op threads while training and scoring (0: leave torch's setting)


@dataclass(frozen=True)
class CharData:
    train: torch.Tensor  # (S,) int64
    val: torch.Tensor  # (S_val,) int64
    itos: list[str]


def load_char_data(config: CharPplConfig) -> CharData:
    path = Path(config.file) if config.file else charlm.TINY_SHAKESPEARE
    try:
        text = charlm.load_text(path)
    except (OSError, UnicodeDecodeError) as e:
        raise HarnessError(f"char-ppl: cannot read '{path}' as UTF-8 text ({type(e).__name__})") from e
    if not 0 < config.val_fraction < 1:
        raise HarnessError(f"char-ppl.val_fraction={config.val_fraction} must lie strictly between 0 and 1")
    stoi, itos = charlm.char_vocab(text)
    data = charlm.encode(text, stoi)
    cut = int(len(data) * (1 - config.val_fraction))
    val = data[cut:] if config.eval_chars is None else data[cut : cut + config.eval_chars]
    if min(cut, len(val)) < config.seq_len + 1:
        raise HarnessError(f"char-ppl: '{path}' is too short for seq_len={config.seq_len} (lower it)")
    return CharData(data[:cut], val, itos)


def eval_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(W, seq_len) windows overlapping by one: targets row[1:] tile stream[1:] without overlap."""
    return stream.unfold(0, seq_len, seq_len - 1)


@torch.no_grad()
def held_out_nll(lm: charlm.CharLM, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token NLL (nats) over every window's targets."""
    total = 0.0
    for rows in windows.split(batch_size):
        rows = rows.to(device)
        logits = lm.logits(rows)[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum"))
    return total / (windows.shape[0] * (windows.shape[1] - 1))


class CharPerplexity(Task):
    name = "char-ppl"
    version = "1.0"
    description = "Tiny Shakespeare, character level: train each ladder model briefly, bits per char on the last 10%"
    config_class = CharPplConfig
    needs = frozenset({Capability.LADDER})
    metrics = {
        "bits_per_char": MetricSpec(higher_is_better=False, pair_atol=0.02, gate_atol=0.02),
        "val_loss": MetricSpec(higher_is_better=False, pair_atol=0.015, gate_atol=0.015),
        "train_loss": MetricSpec(higher_is_better=False, pair_atol=0.02, gate_atol=0.02),
        "train_seconds": MetricSpec(higher_is_better=None, pair_atol=math.inf, gate_atol=math.inf),  # not compared
    }

    def refusal(self, model: ModelAdapter, capability: Capability) -> str:
        return ladder_refusal(self.name, model.name)

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        with torch_threads(self.config.threads):
            metrics = list(self.train_and_score(model.require(Ladder, self.name), ctx))
        yield from metrics

    def train_and_score(self, model: Ladder, ctx: RunContext) -> Iterator[Metric]:
        c, data = self.config, load_char_data(self.config)
        lm = model.new_lm(len(data.itos), c.seq_len, derive_seed(ctx.seed, "char-ppl", "init"))
        start = time.perf_counter()
        losses = model.train(lm, data.train, Recipe(c.steps, c.batch_size, c.seq_len, c.lr,
                                                    derive_seed(ctx.seed, "char-ppl", "batches")))
        seconds = time.perf_counter() - start
        windows = eval_windows(data.val, c.seq_len)
        val_loss = held_out_nll(lm, windows, c.eval_batch_size, model.device)
        targets = windows.shape[0] * (c.seq_len - 1)
        info = {"vocab": len(data.itos), "train_chars": len(data.train), "sample": self.sample(lm, data, ctx, model)}
        yield self.metric("val_loss", val_loss, n=targets, extra=info)
        yield self.metric("bits_per_char", val_loss / math.log(2), n=targets, extra=info)
        yield self.metric("train_loss", self.train_loss(lm, losses, data, model.device))
        yield self.metric("train_seconds", seconds, n=c.steps if losses else None)

    def train_loss(self, lm: charlm.CharLM, losses: list[float], data: CharData, device: torch.device) -> float:
        """Mean loss of the last 10% of the steps; counting models: NLL on as much training text as is held out."""
        if losses:
            tail = losses[-max(1, len(losses) // 10):]
            return sum(tail) / len(tail)
        windows = eval_windows(data.train[: len(data.val)], self.config.seq_len)
        return held_out_nll(lm, windows, self.config.eval_batch_size, device)

    def sample(self, lm: charlm.CharLM, data: CharData, ctx: RunContext, model: ModelAdapter) -> str:
        """seq_len characters after a newline, sampled at temperature 1 (shown in the report)."""
        gen = torch.Generator(device=model.device).manual_seed(derive_seed(ctx.seed, "char-ppl", "sample"))
        start = data.itos.index("\n") if "\n" in data.itos else 0
        prefix = torch.tensor([start], device=model.device)
        ids = lm.sample(1, self.config.seq_len, generator=gen, prefix=prefix)[0]
        return charlm.decode(ids.cpu(), data.itos)

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        return char_ppl_section(history)


def char_ppl_section(history: pd.DataFrame) -> str:
    """Markdown: bits per character in ladder order, with each model's sample."""
    from harness.api import latest

    rows = latest(history)
    rows = rows[rows["metric"] == "bits_per_char"]
    if rows.empty:
        return ""
    ladder = list(LADDER_ORDER)
    rank = lambda model: ladder.index(model) if model in ladder else len(ladder)  # noqa: E731
    lines = ["### The ladder on Tiny Shakespeare", "", "| model | weights | bits/char | sample (temperature 1) |",
             "|---|---|---|---|"]
    for _, r in sorted(rows.iterrows(), key=lambda item: (rank(item[1]["model"]), item[1]["weights"])):
        sample = (r["extra"] or {}).get("sample", "").replace("|", "\\|").replace("`", "'").replace("\n", " \u21b5 ")
        lines.append(f"| {r['model']} | `{r['weights']}` | {r['value']:.3f} | `{sample}` |")
    return "\n".join(lines) + "\n"


TASKS.add(CharPerplexity.name, CharPerplexity.description, CharPerplexity)
