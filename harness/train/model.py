"""The model a run trains: its initial weights (a seeded random init whose GPT-2 shape `--set
model.KEY=VALUE` may change, any `--weights`, or the checkpoint being resumed), the run's dropout
rate, and the adapter built from them through the model registry, as `harness run` builds it, so
`gpt2-scratch` and `gpt2-hf` start from the very same tensors.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from harness.api import (
    MODELS,
    HarnessError,
    ModelAdapter,
    ModelSpec,
    Trainable,
    UnknownNameError,
    Weights,
    coerce_config,
    load_weights,
    tensor_sha256,
)
from harness.train.config import TASK, TrainConfig, TrainRun

DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")


@dataclass(frozen=True)
class GPT2Shape:
    """The keys `--set model.KEY=VALUE` may change in a random GPT-2 init, named as in the scratch
    GPT2Config; `HF_NAMES` maps each to its field of `transformers.GPT2Config`. The vocabulary follows
    the tokenizer, the context `train.block_size` and the dropout `train.dropout`."""

    n_layer: int
    n_head: int
    n_embd: int
    layer_norm_eps: float

    HF_NAMES = {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "layer_norm_eps": "layer_norm_epsilon"}

    @classmethod
    def of(cls, hf_config) -> GPT2Shape:
        return cls(**{key: getattr(hf_config, name) for key, name in cls.HF_NAMES.items()})

    def apply(self, hf_config) -> None:
        for key, name in self.HF_NAMES.items():
            setattr(hf_config, name, getattr(self, key))

    def check(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


def build_model(run: TrainRun, cfg: TrainConfig, saved: dict | None = None) -> ModelAdapter:
    """The adapter to train, built as `harness run` builds it, so scratch and HF share weights."""
    spec: ModelSpec = MODELS.get(run.model)
    weights = resume_weights(spec, run, saved) if saved else initial_weights(spec, run, cfg)
    torch.manual_seed(cfg.seed)
    adapter = spec.build(with_dropout(weights, cfg.dropout), cfg.device)
    adapter.require(Trainable, task=TASK)
    if cfg.block_size > adapter.max_length:
        raise HarnessError(
            f"train.block_size={cfg.block_size} exceeds {run.model}'s context of "
            f"{adapter.max_length}; lower --block-size"
        )
    return adapter


def initial_weights(spec: ModelSpec, run: TrainRun, cfg: TrainConfig) -> Weights:
    """`--weights` as given, or a seeded random init at `--size` (GPT-2: reshaped by `--set model.*`)."""
    if run.weights:
        if run.model_overrides:
            raise HarnessError("--set model.KEY=VALUE only applies to a random init (--size), not --weights")
        return load_weights(spec.arch, run.weights, cfg.seed)
    size = run.size or spec.arch.default_size
    if spec.arch.name != "gpt2":
        if run.model_overrides:
            raise HarnessError(f"--set model.KEY=VALUE is implemented for gpt2 only, not {spec.arch.name}")
        return load_weights(spec.arch, f"random:{size}", cfg.seed)
    return random_gpt2(spec, size, cfg, dict(run.model_overrides))


def random_gpt2(spec: ModelSpec, size: str, cfg: TrainConfig, overrides: dict[str, str]) -> Weights:
    """A seeded GPT-2 init at a named size; vocabulary from the tokenizer, context from block_size."""
    arch = spec.arch
    if size not in arch.sizes():
        raise UnknownNameError(f"unknown gpt2 size '{size}'; known sizes: {', '.join(arch.sizes())}")
    tokenizer = arch.tokenizer()
    config = arch.random_config(size, tokenizer)
    shape = coerce_config(GPT2Shape, overrides, "model", base=GPT2Shape.of(config))
    try:
        shape.check()
    except ValueError as e:
        raise HarnessError(f"gpt2 size {size} with {overrides}: {e}") from e
    shape.apply(config)
    config.n_positions = cfg.block_size
    _set_dropout(config, cfg.dropout)
    torch.manual_seed(cfg.seed)
    state = {k: v.detach().clone() for k, v in arch.hf_model_class(config).state_dict().items()}
    values = {k: getattr(shape, k) for k in overrides}
    shown = ",".join(f"{k}={v}" for k, v in sorted({**values, "block_size": cfg.block_size}.items()))
    return Weights(f"random:{size}[{shown}]", tensor_sha256(state), config, state, tokenizer)


def with_dropout(weights: Weights, rate: float) -> Weights:
    """weights with every dropout rate of its config set to `rate` (a copy: `weights` is unchanged)."""
    config = copy.deepcopy(weights.hf_config)
    _set_dropout(config, rate)
    return dataclasses.replace(weights, hf_config=config)


def _set_dropout(config, rate: float) -> None:
    for name in DROPOUT_FIELDS:
        if hasattr(config, name):
            setattr(config, name, rate)


def resume_weights(spec: ModelSpec, run: TrainRun, saved: dict) -> Weights:
    """The checkpoint in run.out (fp32 if it was saved at lower precision), under its run's init identity."""
    weights = load_weights(spec.arch, run.out, saved["config"]["seed"])
    state = saved.get("model_fp32") or weights.state_dict
    return dataclasses.replace(weights, identity=saved["init_identity"], sha256=saved["init_sha256"], state_dict=state)
