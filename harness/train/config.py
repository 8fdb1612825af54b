"""What a training run is: its hyperparameters (`TrainConfig`), what it trains on and where it writes
(`TrainRun`), what it returns (`TrainResult`), and the `--set train.KEY=VALUE` / `model.KEY=VALUE`
overrides, coerced by the API's one config parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from harness.api import HarnessError, coerce_config, parse_overrides
from harness.api.store import DEFAULT_RESULTS_DIR

TASK = "train"
TASK_VERSION = "1.0"
SCOPES = ("train", "model")  # --set train.KEY=VALUE (a TrainConfig field), model.KEY=VALUE (the init's shape)
POSITIVE = ("steps", "batch_size", "block_size", "grad_accum", "eval_interval", "eval_batches", "log_interval")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a run; each is a flag (`--batch-size 8`) and a `--set train.KEY=VALUE`."""

    steps: int = _f(1000, "optimizer steps; the cosine schedule ends here")
    batch_size: int = _f(8, "sequences per micro-batch, over all ranks under torchrun (each takes its share)")
    block_size: int = _f(256, "tokens per sequence (<= the model's context)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _f(100, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW decay on parameters with >= 2 dims (not biases or LayerNorms)")
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW betas, e.g. 0.9,0.95")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    dropout: float = _f(0.0, "dropout rate (embeddings, attention, residuals)")
    eval_interval: int = _f(100, "evaluate and checkpoint every N steps")
    eval_batches: int = _f(20, "validation batches per evaluation")
    log_interval: int = _f(10, "write a train_loss row (mean of the last N steps) every N steps")
    seed: int = _f(0, "initialisation, batch order and dropout")
    device: str = _f("cpu", "cpu or cuda")
    save_dtype: Literal["float32", "float16", "bfloat16"] = _f(
        "float32", "dtype of model.safetensors (config.json says float32: loading upcasts)"
    )

    def __post_init__(self) -> None:
        for name in POSITIVE:
            if getattr(self, name) < 1:
                raise HarnessError(f"train.{name}={getattr(self, name)}: must be at least 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise HarnessError(f"train.betas={self.betas}: expected two numbers in [0, 1), e.g. 0.9,0.95")
        if self.min_lr > self.lr or self.lr <= 0:
            raise HarnessError(f"train.lr={self.lr}, train.min_lr={self.min_lr}: need 0 < min_lr <= lr")


@dataclass(frozen=True)
class TrainRun:
    """What is trained, on what, and where it goes (everything that is not a hyperparameter)."""

    model: str  # registry name: gpt2-scratch or gpt2-hf
    data: str  # tinyshakespeare | wikitext2 | PATH
    out: str  # checkpoint directory
    size: str | None = None  # named size for a random init (default: the architecture's)
    weights: str | None = None  # start from these weights instead (any `--weights` form)
    model_overrides: tuple[tuple[str, str], ...] = ()  # (GPT2Config field, raw value), random init only
    results_dir: str = DEFAULT_RESULTS_DIR  # git-ignored runs/results (harness/api/store.py)
    tensorboard: str | None = None  # a directory for TensorBoard event files (rank 0 writes them)


@dataclass
class TrainResult:
    train_losses: list[float]  # loss of step s at index s - 1
    val_losses: dict[int, float]  # step -> validation loss
    tokens_per_second: float
    out: Path


# Defaults that suit a long run only, and what they become when not given (`sized_to_steps`).
SCALED_DEFAULTS = {"warmup_steps": "min(100, steps // 10)", "eval_batches": "min(20, max(1, steps // 10))"}


def sized_to_steps(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """cfg with the defaults that only suit a long run scaled to `cfg.steps`, unless `given` names them:
    warmup_steps = min(100, steps // 10), so `--steps 100` is not all warmup, and eval_batches =
    min(20, max(1, steps // 10)), so a 10-step smoke run does not spend most of its time evaluating."""
    scaled = {
        "warmup_steps": min(TrainConfig.warmup_steps, cfg.steps // 10),
        "eval_batches": min(TrainConfig.eval_batches, max(1, cfg.steps // 10)),
    }
    return replace(cfg, **{k: v for k, v in scaled.items() if k not in given})


def make_train_config(base: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """base with string overrides coerced to each field's declared type."""
    return coerce_config(TrainConfig, overrides, "train", base=base)


def split_overrides(items: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """["train.lr=1e-3", "model.n_embd=128"] -> ({"lr": "1e-3"}, {"n_embd": "128"})."""
    scoped: dict[str, dict[str, str]] = {scope: {} for scope in SCOPES}
    for item in items:
        try:
            ((scope, values),) = parse_overrides([item], list(SCOPES)).items()
        except HarnessError:
            raise HarnessError(f"--set {item!r}: expected train.KEY=VALUE or model.KEY=VALUE (train.lr=3e-4)") from None
        scoped[scope].update(values)
    return scoped["train"], scoped["model"]


def show(value: Any) -> str:
    """A config value as a flag takes it: tuples comma-joined (`0.9,0.95`), everything else as str()."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
