"""The `ngram-rules` task on a pretrained causal LM (e.g. `--model llama-hf,llama-scratch --weights smollm2`).

The rule language of tasks/ngram_rules_lang.py is written as text: symbol s is the word " a", " b", ...
(one token each, checked on the model's tokenizer before any work), one sequence of L symbols per
line. For every order N two subtasks measure how well the LLM knows the rule:

- `n=N icl` (in context): each of M = `llm_samples` prompts is the tokenizer's start token (BOS, else
  end-of-text) and K = `icl_examples` training sequences, one per line (a different seeded draw of
  K sequences per prompt); the model then samples L symbols;
- `n=N ft` (fine-tuned): a copy of the weights is trained with AdamW for `ft_steps` steps of
  `ft_batch_size` training sequences (start token, then the L symbols; next-token loss on the
  symbols; dropout off, so a scratch model and its reference take the same steps), then samples L
  symbols after the start token alone. The adapter's own module is never changed.

Sampling uses the model's own decoding loop with its KV cache, restricted to the V symbol tokens
(renormalised over them, temperature `temperature`): every sample is a well-formed sequence, so
the rows measure knowledge of the rule, not following the one-symbol-per-word format. Rows (the
meanings of tasks/ngram_rules.py): `valid_rate` with a 95% Wilson interval over the M samples,
`token_valid_rate` with a 95% Student-t interval over the samples' shares of valid constrained
symbols (symbols of one sample are not independent), both in `extra.ci_low` / `extra.ci_high`;
`train_seconds` for `ft`. The training sequences are the ladder's (same `train_samples`, same seed).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from harness.api import CausalLM, HarnessError, Metric, RunContext, TextTokenizer, torch_threads
from tasks.common import mean_interval

if TYPE_CHECKING:
    from tasks.ngram_rules import NGramRules

LETTERS = "abcdefghijklmnopqrstuvwxyz"  # symbol s is written " " + LETTERS[s]
MODES = ("icl", "ft")
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def subtask(n: int, mode: str) -> str:
    return f"n={n} {mode}"


@dataclass(frozen=True)
class SymbolText:
    """The rule language as tokens: symbol s is token `ids[s]`, lines end with `newline`, and every
    prompt and training row starts with `start`."""

    ids: tuple[int, ...]
    newline: int
    start: int

    def lines(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, K, L) symbols -> (B, K * (L + 1)) tokens: K lines, each L symbols and a newline."""
        tokens = torch.tensor(self.ids)[seqs]  # (B, K, L)
        newlines = torch.full((*seqs.shape[:2], 1), self.newline)
        return torch.cat([tokens, newlines], dim=-1).flatten(1)

    def with_start(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full((tokens.shape[0], 1), self.start), tokens], dim=1)

    def symbols(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) sampled tokens -> (B, L) symbols; a token that is not a symbol is an error."""
        lookup = {t: s for s, t in enumerate(self.ids)}
        flat = tokens.flatten().tolist()
        if any(t not in lookup for t in flat):
            raise HarnessError(f"sampling picked a token outside the symbols {self.ids}")
        return torch.tensor([lookup[t] for t in flat], dtype=torch.long).view(tokens.shape)


def render(seq: list[int]) -> str:
    """One sequence as the text the model reads, e.g. [0, 2, 1] -> " a c b"."""
    return "".join(" " + LETTERS[s] for s in seq)


def symbol_text(tokenizer: TextTokenizer, vocab: int, model: str) -> SymbolText:
    """The symbols' token ids on `tokenizer`, refused in one line unless each symbol and the newline
    is one token of its own and a rendered line tokenizes to exactly those ids."""
    if vocab > len(LETTERS):
        raise HarnessError(f"ngram-rules on an LLM writes symbols as letters: vocab <= {len(LETTERS)} "
                           f"(got {vocab}); e.g. --set ngram-rules.vocab=4")
    words = [" " + c for c in LETTERS[:vocab]]
    ids = [tokenizer.encode(w) for w in [*words, "\n"]]
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
        raise HarnessError(f"ngram-rules: {model}'s tokenizer does not map each of {words + ['newline']} to "
                           f"one distinct token (got {ids}), so sampled tokens cannot be read as symbols")
    text = SymbolText(tuple(i[0] for i in ids[:-1]), ids[-1][0], tokenizer.prefix_token_id)
    probe = list(range(vocab)) * 2
    expected = text.lines(torch.tensor([[probe, probe]]))[0].tolist()
    if tokenizer.encode((render(probe) + "\n") * 2) != expected:
        raise HarnessError(f"ngram-rules: {model}'s tokenizer merges symbols across words, so "
                           "lines of symbols are not one token per symbol")
    return text


def check_llm(task: NGramRules, model: CausalLM) -> None:
    """Refuse, before any work, a tokenizer that cannot write the symbols or a prompt that is too long."""
    c = task.config
    symbol_text(model.tokenizer, c.vocab, model.name)
    needed = 1 + c.icl_examples * (c.seq_len + 1) + c.seq_len
    if needed > model.max_length:
        fit = max((model.max_length - 1 - c.seq_len) // (c.seq_len + 1), 0)
        raise HarnessError(f"ngram-rules: {c.icl_examples} in-context examples of {c.seq_len} symbols need "
                           f"{needed} tokens, more than {model.name}'s {model.max_length}; "
                           f"e.g. --set ngram-rules.icl_examples={fit}")


def run_llm(task: NGramRules, model: CausalLM, ctx: RunContext) -> Iterator[Metric]:
    """Subtasks `n=N icl` and `n=N ft` for every N, resumable (each with every seed of `seeds`)."""
    from tasks.ngram_rules import combine_seeds

    c = task.config
    text = symbol_text(model.tokenizer, c.vocab, model.name)
    seeds = [ctx.seed + r for r in range(c.seeds)]
    items = [(n, mode) for n in c.n for mode in MODES]
    todo = ctx.subtasks(items, key=lambda item: subtask(*item))
    for n, mode in ctx.track(todo, total=len(items), description=f"{task.name} {model.name}"):
        with torch_threads(c.llm_threads):
            runs = [list(llm_order(task, model, text, n, mode, s)) for s in seeds]
        yield from combine_seeds(runs, seeds)


def llm_order(task: NGramRules, model: CausalLM, text: SymbolText, n: int, mode: str,
              seed: int) -> Iterator[Metric]:
    """One order, one mode, one seed: sample, then score against the rule."""
    from tasks.ngram_rules import derive_seed

    c, lang = task.config, task.language(n, seed)
    train = lang.sample(c.train_samples, derive_seed(seed, "train", n))  # the ladder's training set
    module, seconds, losses = model.module, None, []
    if mode == "icl":
        prompts = text.with_start(text.lines(icl_examples(train, c.llm_samples, c.icl_examples,
                                                          derive_seed(seed, "icl-prompts", n))))
    else:
        start = time.perf_counter()
        module, losses = fine_tune(model, text, train, task, derive_seed(seed, "ft-batches", n))
        seconds = time.perf_counter() - start
        prompts = torch.full((c.llm_samples, 1), text.start)
    start = time.perf_counter()
    out = model.sample_batch(prompts, c.seq_len, c.temperature, derive_seed(seed, "llm-sample", mode, n),
                             allowed=list(text.ids), module=module)
    sampled = text.symbols(out[:, prompts.shape[1]:].cpu())
    info = {"mode": mode, "icl_examples": c.icl_examples if mode == "icl" else 0, "rule_seed": lang.spec.seed,
            "sample_seconds": time.perf_counter() - start, "example": render(sampled[0].tolist())}
    if mode == "ft":
        info.update(ft_steps=c.ft_steps, ft_batch_size=c.ft_batch_size, ft_lr=c.ft_lr,
                    final_train_loss=losses[-1] if losses else None)
    yield from score(task, n, mode, lang.token_valid(sampled), info, seconds)


def icl_examples(train: torch.Tensor, prompts: int, k: int, seed: int) -> torch.Tensor:
    """(prompts, k, L): for each prompt, k distinct training sequences drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.stack([torch.randperm(len(train), generator=g)[:k] for _ in range(prompts)])
    return train[picks]


def fine_tune(model: CausalLM, text: SymbolText, train: torch.Tensor, task: NGramRules,
              seed: int) -> tuple[torch.nn.Module, list[float]]:
    """A trained copy of the model's module and its step losses: AdamW (no weight decay, gradients
    clipped at norm 1) on batches of training rows in a seeded order (an epoch per permutation)."""
    c = task.config
    tuned = copy.deepcopy(model.module)
    tuned.eval()  # dropout off: deterministic, and the same steps for a scratch model and its reference
    rows = text.with_start(torch.tensor(text.ids)[train]).to(model.device)  # (K, L + 1)
    order = batch_order(len(rows), c.ft_steps * c.ft_batch_size, seed)
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.ft_lr, weight_decay=0.0)
    losses = []
    for step in range(c.ft_steps):
        batch = rows[order[step * c.ft_batch_size:(step + 1) * c.ft_batch_size]]
        logits = model.forward(tuned, batch[:, :-1])  # (B, L, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    tuned.zero_grad(set_to_none=True)
    return tuned, losses


def batch_order(rows: int, count: int, seed: int) -> torch.Tensor:
    """`count` row indices: seeded permutations of range(rows), one after another."""
    g = torch.Generator().manual_seed(seed)
    epochs = max(1, math.ceil(count / rows))
    return torch.cat([torch.randperm(rows, generator=g) for _ in range(epochs)])[:count]


def score(task: NGramRules, n: int, mode: str, ok: torch.Tensor, info: dict,
          seconds: float | None) -> Iterator[Metric]:
    sub, constrained = subtask(n, mode), ok[:, n - 1:].double()
    valid, shares = ok.all(dim=1).double(), constrained.mean(dim=1)
    # stderr over the samples: the pair check (harness/api/tolerance.py) then allows for two draws of
    # M samples, which differ as soon as fine-tuning rounds differently on the two implementations.
    low, high = wilson(int(valid.sum()), len(valid))
    yield task.metric("valid_rate", valid.mean(), subtask=sub, n=len(valid), stderr=mean_interval(valid.tolist())[1],
                      extra={**info, "ci_low": low, "ci_high": high, "ci_level": 0.95, "ci": "wilson"})
    _, stderr, low, high = mean_interval(shares.tolist(), clip=True)
    yield task.metric("token_valid_rate", constrained.mean(), subtask=sub, n=constrained.numel(), stderr=stderr,
                      extra={**info, "ci_low": low, "ci_high": high, "ci_level": 0.95, "ci": "t over samples"})
    if seconds is not None:
        yield task.metric("train_seconds", seconds, subtask=sub, extra=info)


def wilson(successes: int, trials: int) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if trials == 0:
        return 0.0, 1.0
    p, z2 = successes / trials, Z95 * Z95
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = Z95 * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)
