"""`harness generate`: continue a prompt with any model that can generate, through its adapter.

    harness generate --model gpt2-scratch --weights harness/assets/gpt2-default --prompt "The game"

Greedy at --temperature 0 (the default); otherwise seeded sampling with optional top-k / top-p.
Only the continuation goes to stdout (so it can be piped); what was loaded goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console

from harness.api import Generator, HarnessError

if TYPE_CHECKING:  # torch (and the adapter) are imported when the command runs: `harness list` stays fast
    from harness.api import ModelAdapter


@dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 50
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None  # keep the k most likely tokens (sampling only)
    top_p: float | None = None  # keep the smallest set with this much probability (sampling only)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise HarnessError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise HarnessError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise HarnessError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise HarnessError(f"--top-k {self.top_k}: must be at least 1")
        if self.seed < 0:
            raise HarnessError(f"--seed {self.seed}: must be >= 0")


def load_model(name: str, weights: str | None, seed: int = 0, device: str = "cpu",
               reference: str | None = None) -> ModelAdapter:
    """Build a registered model (or a user's `PATH.py:NAME` held to `reference`) on its weights exactly as
    `harness run` does."""
    import torch

    from harness.api import MODELS, check_device, load_weights

    spec = MODELS.resolve(name, reference)
    check_device(device)
    resolved = load_weights(spec.arch, weights, seed)
    torch.manual_seed(seed)
    return spec.build(resolved, device)


def continuation(model: ModelAdapter, prompt: str, cfg: GenerateConfig) -> str:
    """The generated text after `prompt` (an empty prompt starts from <|endoftext|>)."""
    model = model.require(Generator, task="generate")
    ids = model.tokenizer.encode(prompt) or [model.tokenizer.eot_id]
    room = model.max_length - len(ids)
    if room < 1:
        raise HarnessError(f"the prompt is {len(ids)} tokens; {model.name} sees at most {model.max_length}")
    if cfg.max_new_tokens > room:
        raise HarnessError(
            f"prompt ({len(ids)} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds "
            f"{model.name}'s context of {model.max_length}; "
            f"use --max-new-tokens {room} or less"
        )
    new = model.generate(
        ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed
    )
    return model.tokenizer.decode(new)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a model (greedy or seeded sampling)",
        description="Print the continuation of --prompt by --model on --weights.",
    )
    p.add_argument("--model", required=True, help="registry name, e.g. gpt2-scratch or gpt2-hf, or your own "
                   "PATH.py:NAME / package.module:NAME with --reference (docs/bring-your-own.md)")
    p.add_argument("--reference", default=None, metavar="REF",
                   help="the registered reference a PATH.py:NAME model is held to (e.g. gpt2-hf): its "
                        "architecture, default weights and tokenizer")
    p.add_argument("--weights", default=None, help="random[:SIZE] | alias | HF-format dir (default: the model's)")
    p.add_argument("--prompt", required=True, help="text to continue ('' starts from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=GenerateConfig.max_new_tokens)
    p.add_argument("--temperature", type=float, default=GenerateConfig.temperature, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and init seed for random weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = GenerateConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    model = load_model(args.model, args.weights, args.seed, args.device, args.reference)
    model.require(Generator, task="generate")  # refused before anything is printed
    Console(stderr=True).print(
        f"{model.name} on weights {model.weights.identity} "
        f"({'greedy' if cfg.temperature == 0 else f'sampling, seed {cfg.seed}'})",
        highlight=False,
        markup=False,
    )
    sys.stdout.write(continuation(model, args.prompt, cfg) + "\n")
    sys.stdout.flush()
    return 0
