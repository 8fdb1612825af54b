"""Task `ngram-rules`: how much context can each rung of the ladder learn to use?

For every rule order N in `ngram-rules.n` (subtask `n=N`) the task draws a rule language
(tasks/ngram_rules_lang.py: every symbol after the first N-1 is uniform over an allowed set fixed
by the symbol N-1 back under the default `rule=lag`, by all N-1 previous symbols under
`rule=table`; either way nothing can be predicted from fewer), trains a fresh model of
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

A pretrained causal LM (e.g. llama-hf with --weights smollm2) is measured instead in context and
after fine-tuning on the same training sequences: subtasks `n=N icl` and `n=N ft`, see
tasks/ngram_rules_llm.py.
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

from harness.api import (
    TASKS,
    Capability,
    CausalLM,
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
from tasks import ngram_rules_llm as llm
from tasks.common import ladder_refusal, mean_interval
from tasks.ngram_rules_lang import TASK_VERSION, RuleLanguage, RuleSpec
from tasks.workers import map_jobs


@dataclass(frozen=True)
class NGramRulesConfig:
    n: tuple[int, ...] = (2, 3, 4, 6, 8)  # rule orders N, one subtask each
    train_samples: int = 2000  # K training sequences per N
    samples: int = 500  # M sequences sampled from each trained model
    eval_samples: int = 500  # held-out sequences scored for nll
    # The recipe (docs/ngram_rules.md, "The published run"): 500 steps of 64 sequences of 24 symbols at a
    # constant 4e-3 keep both char transformers >= 0.95 at every N and the 3-seed staircase near 9 minutes
    # on 2 cores (1000 steps of 32 sequences of 32 at 3e-3, the earlier default, took ~17).
    steps: int = 500  # optimiser steps of the neural models (counts read the data once)
    batch_size: int = 64
    lr: float = 4e-3  # AdamW
    seq_len: int = 24  # L, symbols per sequence
    vocab: int = 4  # V
    allowed: int = 2  # k, size of each allowed set
    temperature: float = 1.0  # sampling temperature
    threads: int = 1  # torch intra-op threads while training and sampling (0: leave torch's setting)
    seeds: int = 1  # replicates per N: seeds --seed, --seed+1, ...; rows hold the mean and a t-interval
    rule: str = "lag"  # "lag" (the symbol N-1 back picks the allowed set) or "table" (all N-1 symbols do)
    schedule: str = "constant"  # learning rate of the neural models: "constant" or "cosine" (to 0)
    workers: int = 1  # processes running (order, seed) jobs side by side (tasks/workers.py); rows do not change
    # A causal LM instead of the ladder (tasks/ngram_rules_llm.py): subtasks `n=N icl` and `n=N ft`
    # Defaults sized for SmolLM2-135M on 2 CPU cores (~170 prefill, ~50 training tokens/s): about 2 minutes
    # per order and model; the rates' Wilson intervals are wide (+-0.2 at 24 samples), not hidden.
    icl_examples: int = 4  # training sequences in each in-context prompt, one per line
    llm_samples: int = 24  # sequences sampled per subtask (and in-context prompts)
    ft_steps: int = 15  # AdamW steps of the fine-tuned copy
    ft_batch_size: int = 8  # training sequences per step
    ft_lr: float = 3e-4
    llm_threads: int = 0  # torch intra-op threads for the LLM (0: leave torch's setting)


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
    needs = frozenset()  # a ladder model or a causal LM with a text tokenizer: see check
    metrics = {
        # A pair shares init and batches but not rounding: training amplifies 1e-7 differences, most of
        # all when a model leaves its plateau (docs/ngram_rules.md), hence tolerances, not equality.
        "valid_rate": MetricSpec(higher_is_better=True, pair_atol=0.05, gate_atol=0.05),
        "token_valid_rate": MetricSpec(higher_is_better=True, pair_atol=0.01, gate_atol=0.01),
        "nll": MetricSpec(higher_is_better=False, pair_atol=0.02, gate_atol=0.02),
        "entropy_bound": MetricSpec(higher_is_better=None, pair_atol=1e-12, gate_atol=1e-12),
        # The LLM's `n=N icl` / `n=N ft` rows (tasks/ngram_rules_llm.py) use the two rates and train_seconds.
        "train_seconds": MetricSpec(higher_is_better=None, pair_atol=math.inf, gate_atol=math.inf),  # not compared
    }

    def check(self, model: ModelAdapter) -> None:
        if model.can(Capability.LADDER):
            return
        if not model.can(Capability.CAUSAL_LM):
            raise HarnessError(self.refusal(model, Capability.LADDER))
        llm.check_llm(self, model.require(CausalLM, self.name))

    def refusal(self, model: ModelAdapter, capability: Capability) -> str:
        return f"{ladder_refusal(self.name, model.name)}, nor a causal LM (e.g. llama-hf, gpt2-scratch)"

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        if not model.can(Capability.LADDER):
            yield from llm.run_llm(self, model.require(CausalLM, self.name), ctx)
            return
        c, ladder = self.config, model.require(Ladder, self.name)
        seeds = [ctx.seed + r for r in range(c.seeds)]
        todo = [n for n in c.n if not ctx.completed(f"n={n}")]  # --resume skips the orders already finished
        results = map_jobs(order_job, [(self, ladder, n, s) for n in todo for s in seeds], c.workers)
        orders = ctx.subtasks(c.n, key=lambda n: f"n={n}")
        for _ in ctx.track(orders, total=len(c.n), description=f"{self.name} {model.name}"):
            yield from combine_seeds([next(results) for _ in seeds], seeds)

    def validate(self) -> None:
        if self.config.seeds < 1:
            raise HarnessError(f"{self.name}.seeds must be >= 1 (got {self.config.seeds}); "
                               f"e.g. --set {self.name}.seeds=3")
        if self.config.workers < 1:
            raise HarnessError(f"{self.name}.workers must be >= 1 (got {self.config.workers}); "
                               f"e.g. --set {self.name}.workers=2 to use two cores")
        if self.config.schedule not in charlm.SCHEDULES:
            raise HarnessError(f"{self.name}.schedule must be one of {', '.join(charlm.SCHEDULES)} "
                               f"(got {self.config.schedule!r}); e.g. --set {self.name}.schedule=cosine")
        c = self.config
        for key, low in (("icl_examples", 0), ("llm_samples", 1), ("ft_steps", 0), ("ft_batch_size", 1),
                         ("llm_threads", 0)):
            if getattr(c, key) < low:
                raise HarnessError(f"{self.name}.{key} must be >= {low} (got {getattr(c, key)}); "
                                   f"e.g. --set {self.name}.{key}={getattr(NGramRulesConfig, key)}")
        if not c.ft_lr > 0:
            raise HarnessError(f"{self.name}.ft_lr must be > 0 (got {c.ft_lr}); e.g. --set {self.name}.ft_lr=1e-4")
        for n in self.config.n:
            self.language(n, 0)  # a bad order or alphabet is refused before any model is built

    def language(self, n: int, seed: int) -> RuleLanguage:
        c = self.config
        try:
            return RuleLanguage(RuleSpec(n, c.vocab, c.allowed, c.seq_len, seed=derive_seed(seed, "rules", n),
                                         rule=c.rule))
        except ValueError as e:
            raise HarnessError(f"{self.name} n={n}: {e}") from e

    def run_order(self, model: Ladder, n: int, seed: int) -> Iterator[Metric]:
        c, lang = self.config, self.language(n, seed)
        train = lang.sample(c.train_samples, derive_seed(seed, "train", n))
        held = lang.sample(c.eval_samples, derive_seed(seed, "held-out", n))
        lm = model.new_lm(c.vocab, c.seq_len, derive_seed(seed, "init", n))
        recipe = Recipe(c.steps, c.batch_size, c.seq_len, c.lr, derive_seed(seed, "batches", n),
                        schedule=c.schedule)
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
    def variant(config: dict) -> str:
        """Runs of the `table` rule (all rows before issue 13 lack the key) are a different experiment."""
        return "rule=table" if rule_of(config) == "table" else ""

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        from tasks.ngram_rules_report import ngram_rules_section  # matplotlib only when a report is drawn

        return ngram_rules_section(history, Path(fig_dir), Path(report_dir))


def rule_of(config: object) -> str:
    """The rule a row was run with; rows written before the `rule` key existed used the table rule."""
    return config.get("rule", "table") if isinstance(config, dict) else "table"


def order_job(task: NGramRules, ladder: Ladder, n: int, seed: int) -> list[Metric]:
    """One order for one seed, start to finish (a worker process's job; see tasks/workers.py)."""
    with torch_threads(task.config.threads):
        return list(task.run_order(ladder, n, seed))


def combine_seeds(runs: list[list[Metric]], seeds: list[int]) -> Iterator[Metric]:
    """One row per metric from the runs of several seeds (same order of rows in each run): the mean,
    its standard error across seeds and a 95% Student-t interval over seeds (`extra.ci_low/ci_high`,
    clipped to [0, 1] for rates), with every seed's value in `extra.per_seed`. The first seed's
    internals and loss curve are kept (the report draws one model, not an average of them)."""
    for rows in zip(*runs):
        first, values = rows[0], [r.value for r in rows]
        mean, stderr, low, high = mean_interval(values, clip=first.metric in RATES)
        extra = {**first.extra, "seeds": seeds, "per_seed": values}
        if len(values) == 1:
            stderr = first.stderr  # one seed: the row's own (an LLM's, over its samples), else None
        else:
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


TASKS.add(NGramRules.name, NGramRules.description, NGramRules)
