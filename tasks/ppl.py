"""Task `ppl`: perplexity on WikiText-2 (raw, test), scored exactly as lm-eval's `wikitext` task.

Definition (lm-evaluation-harness, task `wikitext` v2.0):
- documents are the 62 articles of the raw test file, split at top-level headings (` = Title = `);
- the target text is the document after wikitext detokenization (`harness.api.data.detokenize`);
- rolling log-likelihood over windows of the model's maximum length; the first token is conditioned
  on lm-eval's prefix token (`HFLM.prefix_token_id`): `ppl.prefix_token_id` if given, else the
  tokenizer's BOS token, else its end-of-text token (GPT-2: <|endoftext|> either way); later
  windows are disjoint in what they score but always see a full window of context (so the last
  window overlaps);
- word count `len(re.split(r"\\s+", original_doc))` and byte count `len(original_doc.encode())` use
  the document before detokenization.
Aggregates are weighted by counts over all documents:
  word_perplexity = exp(-sum LL / sum words),  byte_perplexity = exp(-sum LL / sum bytes),
  bits_per_byte = -sum LL / sum bytes / ln 2,  token_perplexity = exp(-sum LL / sum tokens).

Speed: the LM head runs only on the scored positions, a block of logits at a time, and log p is
logit[target] - logsumexp(logits) (`target_logprobs`): the full (B, T, vocab) log-softmax is never
materialised. Under torchrun the documents are sharded across ranks and the sums all-reduced (`shard`).

`ppl.stride` < max length switches to overlapping sliding windows (each scored token then has at
least max_length - stride tokens of context), as in the transformers perplexity guide.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from harness.api import TASKS, Capability, HarnessError, Metric, MetricSpec, ModelAdapter, RunContext, Task
from harness.api.data import detokenize, load_wikitext_documents, read_text
from harness.api.heads import aligned_head


@dataclass(frozen=True)
class PplConfig:
    split: Literal["test", "valid"] = "test"  # WikiText-2 raw split (the train split is not vendored)
    max_length: int | None = None  # window length in tokens; default: the model's maximum
    stride: int | None = None  # tokens scored per window after the first; default: max_length (disjoint)
    file: str | None = None  # score this UTF-8 text file as one document (no detokenization)
    batch_size: int = 4  # windows per forward pass
    prefix_token_id: int | None = None  # condition the first token on this id (lm-eval's custom_prefix_token_id)


@dataclass(frozen=True)
class Document:
    original: str  # as in the file: counts words and bytes
    target: str  # what the model scores


def rolling_windows(tokens: list[int], prefix_id: int, max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """Windows (ids, n_scored): ids[:-1] is the model input and ids[1:] its next-token targets, at
    most max_length of each; only the last n_scored targets are counted. Every token of `tokens`
    is counted exactly once."""
    seq = [prefix_id, *tokens]  # seq[i] predicts seq[i + 1] = tokens[i]
    windows, start = [], 0
    end = min(len(tokens), max_length)
    while start < len(tokens):
        lo = max(0, end - max_length)
        windows.append((seq[lo : end + 1], end - start))
        start, end = end, min(len(tokens), end + stride)
    return windows


class Perplexity(Task):
    name = "ppl"
    version = "1.1"  # 1.1: the first token is conditioned on lm-eval's prefix token (BOS), not always end-of-text
    description = "WikiText-2 raw test perplexity (word/byte/token, bits per byte), defined as lm-eval's wikitext"
    config_class = PplConfig
    needs = frozenset({Capability.SCORE})
    metrics = {
        m: MetricSpec(higher_is_better=False, pair_rtol=1e-5, gate_rtol=1e-3)
        for m in ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity")
    }

    def validate(self) -> None:
        """Ranges and the text file, before any weights load; max_length against the model's maximum
        and prefix_token_id against its vocabulary are checked in `run`."""
        cfg = self.config
        if cfg.max_length is not None and cfg.max_length < 1:
            raise HarnessError(f"ppl.max_length={cfg.max_length} must be positive (omit it: the model's maximum)")
        if cfg.stride is not None and not 0 < cfg.stride <= (cfg.max_length or cfg.stride):
            raise HarnessError(f"ppl.stride={cfg.stride} must be between 1 and ppl.max_length"
                               f"{'' if cfg.max_length is None else f'={cfg.max_length}'}")
        if cfg.batch_size < 1:
            raise HarnessError(f"ppl.batch_size={cfg.batch_size} must be at least 1")
        if cfg.prefix_token_id is not None and cfg.prefix_token_id < 0:
            raise HarnessError(f"ppl.prefix_token_id={cfg.prefix_token_id} must be a token id (>= 0)")
        if cfg.file is not None:
            if Path(cfg.file).is_dir():
                raise HarnessError(f"ppl.file '{cfg.file}' is a directory; give a UTF-8 text file")
            try:
                text = read_text(Path(cfg.file))
            except HarnessError as e:
                raise HarnessError(f"ppl.file: {e}") from e
            if not text.strip():
                raise HarnessError(f"ppl.file '{cfg.file}': the document set is empty (the file has no text)")

    def documents(self, limit: int | None) -> list[Document]:
        if self.config.file:
            text = read_text(Path(self.config.file))
            docs = [Document(text, text)]
        else:
            docs = [Document(d, detokenize(d)) for d in load_wikitext_documents(self.config.split)]
        docs = docs[:limit] if limit else docs
        if not docs or not any(d.target.strip() for d in docs):
            raise HarnessError("ppl: the document set is empty (check ppl.file / --limit)")
        return docs

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        docs = self.documents(ctx.limit)
        max_length = model.max_length if self.config.max_length is None else self.config.max_length
        if not 0 < max_length <= model.max_length:
            raise HarnessError(f"ppl.max_length={max_length} exceeds {model.name}'s maximum {model.max_length}"
                               if max_length > 0 else f"ppl.max_length={max_length} must be positive")
        stride = max_length if self.config.stride is None else self.config.stride
        if not 0 < stride <= max_length:
            raise HarnessError(f"ppl.stride={stride} must be between 1 and ppl.max_length={max_length}")
        token_lists = model.tokenizer.encode_batch([d.target for d in docs])
        prefix = model.tokenizer.prefix_token_id if self.config.prefix_token_id is None else self.config.prefix_token_id
        if not 0 <= prefix < model.tokenizer.vocab_size:
            raise HarnessError(f"ppl.prefix_token_id={prefix} is outside {model.name}'s vocabulary "
                               f"(0..{model.tokenizer.vocab_size - 1})")
        loglik = score_documents(model, token_lists, prefix, max_length, stride, self.config.batch_size, ctx)
        yield from self.aggregate(docs, token_lists, loglik)

    def aggregate(self, docs: list[Document], token_lists: list[list[int]], loglik: list[float]) -> Iterator[Metric]:
        ll = sum(loglik)
        words = sum(len(re.split(r"\s+", d.original)) for d in docs)
        nbytes = sum(len(d.original.encode("utf-8")) for d in docs)
        tokens = sum(len(t) for t in token_lists)
        counts = {"documents": len(docs), "words": words, "bytes": nbytes, "tokens": tokens, "loglikelihood": ll}
        yield self.metric("word_perplexity", math.exp(-ll / words), n=len(docs), extra=counts)
        yield self.metric("byte_perplexity", math.exp(-ll / nbytes), n=len(docs), extra=counts)
        yield self.metric("bits_per_byte", -ll / nbytes / math.log(2), n=len(docs), extra=counts)
        yield self.metric("token_perplexity", math.exp(-ll / tokens), n=len(docs), extra=counts)


def score_documents(
    model: ModelAdapter, token_lists: list[list[int]], prefix: int, max_length: int, stride: int, batch_size: int,
    ctx: RunContext,
) -> list[float]:
    """Sum of log-likelihoods per document, each conditioned on `prefix` first; windows of all documents
    are batched together. Under torchrun each rank scores its share of the documents (`shard`) and the
    per-document sums are all-reduced, so every rank returns the same list as one process would."""
    world = _world()
    mine = shard([len(t) for t in token_lists], world.size)[world.rank]
    work = [
        (doc, ids, n)
        for doc in mine
        for ids, n in rolling_windows(token_lists[doc], prefix, max_length, stride)
    ]
    work.sort(key=lambda w: -len(w[1]))  # similar lengths together: little padding
    totals = torch.zeros(len(token_lists), dtype=torch.float64)
    batches = [work[i : i + batch_size] for i in range(0, len(work), batch_size)]
    score = _batch_scorer(model)
    with torch.inference_mode():
        for batch in ctx.track(batches, total=len(batches), description=f"ppl {model.name}"):
            totals.index_add_(0, torch.tensor([doc for doc, _, _ in batch]), score(model, batch))
    return world.all_sum(totals).tolist()


# -- scoring a batch of windows -------------------------------------------------------------------------
# lm-eval (and `ModelAdapter.token_logprobs`) computes log_softmax over the full (B, T, vocab) logits and
# then gathers the targets. Only the scored positions need the LM head, so the fast path runs it on
# those positions' final hidden states, CHUNK_LOGITS logits at a time, and never holds the full
# logits. The block is large on purpose: with freed memory reused (harness/api/memory.py) a big GEMM
# and one log_softmax per block are fastest (default model, 2,048 positions: 0.93 s at 256 MB blocks
# against 1.51 s at 16 MB and 0.96 s for the whole batch at once, 1 thread; docs/throughput.md).
# Same arithmetic in float32; sums in float64.
CHUNK_LOGITS = 2**26  # logits per block: 256 MB of float32 (1,335 rows of GPT-2's 50,257)
Batch = list[tuple[int, list[int], int]]  # (document, window ids, scored count)


def _batch_scorer(model: ModelAdapter):
    """The fast scorer where the model exposes its LM head apart (and it reproduces the logits on a
    probe to 1e-5), else the generic one through `token_logprobs`."""
    head = getattr(model, "output_head", lambda: None)()
    if head is None or not _split_reproduces_logits(model, head):
        return _score_batch
    aligned = aligned_head(head)
    return lambda m, batch: _score_batch_split(m, batch, aligned)


def _split_reproduces_logits(model: ModelAdapter, head: torch.nn.Linear) -> bool:
    probe = torch.arange(8).remainder(model.tokenizer.vocab_size)[None, :]
    with torch.inference_mode():
        split = torch.nn.functional.linear(model.final_hidden(probe), head.weight, head.bias)
        return torch.allclose(split.float(), model.logits(probe).float(), rtol=1e-5, atol=1e-5)


def _padded(model: ModelAdapter, batch: Batch) -> torch.Tensor:
    width = max(len(ids) for _, ids, _ in batch)
    padded = torch.full((len(batch), width), model.tokenizer.pad_id, dtype=torch.long)
    for row, (_, ids, _) in enumerate(batch):
        padded[row, : len(ids)] = torch.tensor(ids)
    return padded


def _score_batch(model: ModelAdapter, batch: Batch) -> torch.Tensor:
    """Per-window sums (float64) through `token_logprobs`: the generic path for any Scorer."""
    padded = _padded(model, batch)
    logprobs = model.token_logprobs(padded[:, :-1], padded[:, 1:]).cpu()  # (B, width - 1)
    # row r has len(ids) - 1 real predictions; the last n of them are the ones this window scores
    return torch.stack([logprobs[r, len(ids) - 1 - n : len(ids) - 1].double().sum()
                        for r, (_, ids, n) in enumerate(batch)])


def _score_batch_split(model: ModelAdapter, batch: Batch, head: torch.nn.Linear) -> torch.Tensor:
    """Per-window sums (float64): the LM head only on the scored positions, in chunks."""
    padded = _padded(model, batch)
    width = padded.size(1) - 1
    rows = torch.cat([torch.full((n,), r) for r, (_, _, n) in enumerate(batch)])
    cols = torch.cat([torch.arange(len(ids) - 1 - n, len(ids) - 1) for _, ids, n in batch])
    hidden = model.final_hidden(padded[:, :-1])  # (B, width, C)
    scored = hidden.reshape(-1, hidden.size(-1))[(rows * width + cols).to(hidden.device)]  # (N, C)
    targets = padded[:, 1:][rows, cols].to(hidden.device)
    logprobs = target_logprobs(scored, head, targets).cpu().double()
    return torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, logprobs)


def target_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[targets] as float32 (N,), CHUNK_LOGITS logits at a time."""
    step = max(1, CHUNK_LOGITS // head.out_features)
    out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for i in range(0, len(targets), step):
        logits = torch.nn.functional.linear(hidden[i : i + step], head.weight, head.bias).float()
        out[i : i + step] = torch.log_softmax(logits, 1).gather(1, targets[i : i + step, None]).squeeze(1)
    return out


# -- torchrun: documents sharded across ranks ------------------------------------------------------------
def shard(lengths: list[int], ranks: int) -> list[list[int]]:
    """Document indices per rank: longest first, each to the rank with the fewest tokens so far
    (ties: the lowest rank); deterministic, so every rank computes the same split."""
    load, out = [0] * ranks, [[] for _ in range(ranks)]
    for doc in sorted(range(len(lengths)), key=lambda d: (-lengths[d], d)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        out[rank].append(doc)
        load[rank] += lengths[doc]
    return [sorted(docs) for docs in out]


@dataclass(frozen=True)
class _World:
    rank: int = 0
    size: int = 1

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(t)  # each document is scored on one rank, zeros elsewhere
        return t


def _world() -> _World:
    """The torchrun world (RANK / WORLD_SIZE set), its gloo process group joined on first use; one rank
    without torchrun. The sums are reduced on CPU, whatever the model's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _World()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo")
    return _World(torch.distributed.get_rank(), torch.distributed.get_world_size())


TASKS.add(Perplexity.name, Perplexity.description, Perplexity)
