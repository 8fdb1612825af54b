"""Helpers shared by every reproduction: checkpoint checks and sampling.

Kept deliberately small: anything architecture-specific lives in the
reproduction's own file so that files can be read (and diffed) on their own.

Every neural reproduction (gpt2, gpt1, llama, mla, bert, transformer) exposes the same small
contract, which is all the harness adapters use:

    HF_CLASS = "GPT2LMHeadModel"              the transformers class of the reference, by name
    <Config>.from_name(name, **overrides)     a size of `name_to_config`
    <Config>.from_hf(hf_config)               read a transformers config (duck-typed, no import)
    <Config>.to_hf_kwargs() -> dict           keyword arguments of the transformers config class
    <Model>.from_hf(hf_config, state_dict)    a model holding a reference-layout checkpoint (strict;
                                              CheckpointMismatchError when it does not fit)
    model.to_hf_state_dict(tensors=None)      this model's tensors (or a dict keyed like its
                                              parameters, e.g. gradients) in the reference's names
                                              and layouts
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the architecture (names or shapes)."""


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    got: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    allow_missing: bool = False,
) -> None:
    """Raise a one-line CheckpointMismatchError naming missing/unexpected keys and bad shapes.

    allow_missing: `got` may hold only some of the expected tensors (e.g. the gradients of the
    parameters that have one); unexpected names and wrong shapes are still refused."""
    missing = [] if allow_missing else sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    bad = sorted(
        f"{k} {tuple(got[k].shape)} != {tuple(expected[k])}"
        for k in set(expected) & set(got)
        if tuple(got[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if bad:
        problems.append(f"shape mismatch {_short(bad)}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not match the architecture: " + "; ".join(problems))


def _short(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... (+{len(items) - limit} more)' if len(items) > limit else ''}]"


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy at temperature 0, else top-k/top-p sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
