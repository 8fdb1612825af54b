"""Task `parity`: same weights, same inputs -> same outputs, for a scratch model and its reference.

Metrics (fp32, CPU):
- `max_abs_logit_diff`: max |logits_scratch - logits_ref| over a seeded batch of random token ids;
- `greedy_tokens_equal`: 1.0 if `parity.new_tokens` greedy tokens from `parity.prompt` are identical;
- `max_abs_grad_diff`: max |grad_scratch - grad_ref| over every parameter (compared in the
  reference's names and layouts) after one backward pass of the next-token cross-entropy;
- `max_abs_hidden_diff`: for encoders, max |last hidden state difference| on a padded batch.
Each must be <= its threshold (1e-5 for fp32 differences) for the pair to count as equal.
A reference model has nothing to be compared with and yields no rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.api import (
    TASKS,
    Capability,
    Encoder,
    Generator,
    HarnessError,
    Metric,
    MetricSpec,
    ModelAdapter,
    RunContext,
    Task,
)


@dataclass(frozen=True)
class ParityConfig:
    prompt: str = "The meaning of life is"
    new_tokens: int = 20  # greedy tokens compared
    batch_size: int = 2  # random sequences for the logit and gradient comparison
    seq_len: int = 64  # their length (capped at the model's maximum)
    atol: float = 1e-5  # threshold for the fp32 difference metrics


class Parity(Task):
    name = "parity"
    version = "1.0"
    description = "scratch vs reference on identical weights: max |logit diff|, greedy tokens, max |grad diff|"
    config_class = ParityConfig
    needs = frozenset({Capability.LOGITS})
    metrics = {
        "max_abs_logit_diff": MetricSpec(higher_is_better=False, threshold=1e-5, gate_atol=1e-5),
        "greedy_tokens_equal": MetricSpec(higher_is_better=True, threshold=None),
        "max_abs_grad_diff": MetricSpec(higher_is_better=False, threshold=1e-5, gate_atol=1e-5),
        "max_abs_hidden_diff": MetricSpec(higher_is_better=False, threshold=1e-5, gate_atol=1e-5),
        # RL loss pairs (tasks/rl_rules.py): |loss diff| over TRL's configurations; their grads are held to 1e-6 too
        "max_abs_loss_diff": MetricSpec(higher_is_better=False, threshold=1e-6, gate_atol=1e-6),
    }

    def check(self, model: ModelAdapter) -> None:
        if model.can(Capability.RL_LOSS):  # an RL algorithm's losses, not an LM's logits: see rl_loss_rows
            return
        super().check(model)

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        reference = ctx.reference(model)
        if reference is None:
            return
        if model.can(Capability.RL_LOSS):
            yield from self.rl_loss_rows(model, reference, ctx.seed)
            return
        inputs = self.random_inputs(model, ctx.seed)
        extra = {"atol": self.config.atol, "reference": reference.name}
        if model.can(Encoder) and reference.can(Encoder):
            yield self.metric(
                "max_abs_hidden_diff", hidden_diff(model, reference, inputs), n=inputs.numel(), extra=extra
            )
        yield self.metric("max_abs_logit_diff", logit_diff(model, reference, inputs), n=inputs.numel(), extra=extra)
        yield self.metric("max_abs_grad_diff", grad_diff(model, reference, inputs), n=inputs.numel(), extra=extra)
        if model.can(Generator) and reference.can(Generator):
            yield self.greedy(model, reference)

    def rl_loss_rows(self, model: ModelAdapter, reference: ModelAdapter, seed: int) -> Iterator[Metric]:
        """Same policy, old and reference log-probabilities, rewards and masks -> the same loss and
        gradients as TRL's (tasks/rl_rules.py, `rl_parity`), fp32, each <= 1e-6."""
        from harness.api.capabilities import RLLoss
        from tasks.rl_rules import rl_parity

        loss, grad, detail = rl_parity(model.require(RLLoss, self.name), reference.require(RLLoss, self.name), seed)
        extra = {"atol": 1e-6, "reference": reference.name, **detail}
        yield self.metric("max_abs_loss_diff", loss, extra=extra)
        yield self.metric("max_abs_grad_diff", grad, extra=extra)

    def random_inputs(self, model: ModelAdapter, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        length = min(self.config.seq_len, model.max_length)
        return torch.randint(0, model.tokenizer.vocab_size, (self.config.batch_size, length), generator=g)

    def greedy(self, model: ModelAdapter, reference: ModelAdapter) -> Metric:
        prompt = model.tokenizer.encode(self.config.prompt)
        n = min(self.config.new_tokens, model.max_length - len(prompt))
        ours = model.generate(prompt, n, temperature=0.0)
        theirs = reference.generate(prompt, n, temperature=0.0)
        extra = {
            "prompt": self.config.prompt,
            "scratch_tokens": ours,
            "reference_tokens": theirs,
            "scratch_text": model.tokenizer.decode(ours),
        }
        return self.metric("greedy_tokens_equal", float(ours == theirs), n=n, extra=extra)

    @staticmethod
    def report_section(history, fig_dir, report_dir) -> str:
        return parity_table(history)


def parity_table(history) -> str:
    """Markdown: one row per (scratch model, weights) with every parity metric and a verdict."""
    from harness.api import latest

    rows = latest(history)
    if rows.empty:
        return ""
    metrics = [m for m in Parity.metrics if m in set(rows["metric"])]
    lines = ["### Parity of every reproduction", "", "| model | reference | weights | " + " | ".join(metrics)
             + " | at parity |", "|---|---|---|" + "---|" * (len(metrics) + 1)]
    for (model, weights), block in rows.groupby(["model", "weights"], sort=True):
        values = dict(zip(block["metric"], block["value"]))
        reference = next((e.get("reference") for e in block["extra"] if isinstance(e, dict)), "-")
        ok = all(_within(m, v) for m, v in values.items())
        cells = [f"{values[m]:.3g}" if m in values else "-" for m in metrics] + ["yes" if ok else "**NO**"]
        lines.append(f"| {model} | {reference} | `{weights}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _within(metric: str, value: float) -> bool:
    threshold = Parity.metrics[metric].threshold if metric in Parity.metrics else None
    return value == 1.0 if metric == "greedy_tokens_equal" else threshold is None or value <= threshold


@torch.no_grad()
def logit_diff(model: ModelAdapter, reference: ModelAdapter, inputs: torch.Tensor) -> float:
    return (model.logits(inputs).float() - reference.logits(inputs).float()).abs().max().item()


@torch.no_grad()
def hidden_diff(model: ModelAdapter, reference: ModelAdapter, inputs: torch.Tensor) -> float:
    mask = torch.ones_like(inputs)
    mask[0, inputs.shape[1] // 2 :] = 0  # a padded row, so the attention mask is exercised too
    ours, theirs = model.hidden_states(inputs, mask), reference.hidden_states(inputs, mask)
    keep = mask.bool().to(ours.device)
    return (ours[keep].float() - theirs[keep].float()).abs().max().item()


def grad_diff(model: ModelAdapter, reference: ModelAdapter, inputs: torch.Tensor) -> float:
    ours = reference_grads(model, inputs)
    theirs = reference_grads(reference, inputs)
    missing = sorted(set(theirs) - set(ours))
    if missing:
        raise HarnessError(f"parity: {model.name} has no gradient for reference parameters {missing[:6]}")
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in theirs)


def reference_grads(model: ModelAdapter, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the mean next-token cross-entropy, keyed by the reference's parameter names."""
    module = model.module
    module.zero_grad(set_to_none=True)
    with torch.enable_grad():
        logits = model.logits(inputs)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), inputs[:, 1:].flatten().to(logits.device))
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return model.reference_layout(grads)


TASKS.add(Parity.name, Parity.description, Parity)
