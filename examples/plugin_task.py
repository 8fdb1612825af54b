"""A whole task in under 40 lines: mean log p per token of a few fixed sentences (docs/architecture.md)."""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from harness.api import TASKS, Capability, Metric, MetricSpec, RunContext, Scorer, Task


@dataclass(frozen=True)
class SentenceConfig:
    sentences: tuple[str, ...] = ("The cat sat on the mat.", "Paris is the capital of France.")


@TASKS.register("sentence-logprob", "mean log p per token of a few fixed sentences")
class SentenceLogprob(Task):
    name = "sentence-logprob"
    version = "1.0"
    description = "mean log-probability per token of fixed sentences, each conditioned on end-of-text"
    config_class = SentenceConfig
    needs = frozenset({Capability.SCORE})
    metrics = {"mean_logprob": MetricSpec(higher_is_better=True, pair_atol=1e-5, gate_atol=1e-4)}

    def run(self, model, ctx: RunContext) -> Iterator[Metric]:
        scorer = model.require(Scorer, task=self.name)
        total, count = 0.0, 0
        for text in ctx.track(self.config.sentences, total=len(self.config.sentences), description=self.name):
            ids = scorer.tokenizer.encode(text)
            x = torch.tensor([[scorer.tokenizer.eot_id, *ids[:-1]]])
            total += float(scorer.token_logprobs(x, torch.tensor([ids])).sum())
            count += len(ids)
        yield self.metric("mean_logprob", total / count, n=count)
