"""Resolve `--weights` into one set of tensors shared by a scratch model and its reference.

Accepted forms (per architecture):
  random[:SIZE]    seeded init of the reference class at a named size (the arch's default size if omitted)
  <alias>          a checkpoint shipped with the project or a package (e.g. `default`, `minilm`)
  DIR              an HF-format directory: config.json + model.safetensors / shards / pytorch_model.bin
  owner/name       a Hugging Face hub id (needs network or a populated HF cache)

The tensors are kept in the reference implementation's names and layouts;
scratch models convert them through their tested name map. `sha256` hashes
names, dtypes, shapes and bytes, so two results with the same hash were
computed from bit-identical weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.api.errors import HarnessError, UnknownNameError
from harness.api.tokenizer import TextTokenizer, tokenizer_from_dir


@dataclass(frozen=True)
class ArchSpec:
    """What the harness must know about an architecture to build its weights."""

    name: str
    hf_model_class: Callable[..., torch.nn.Module]  # e.g. transformers.GPT2LMHeadModel
    random_config: Callable[[str, TextTokenizer], object]  # (size, tokenizer) -> transformers config
    sizes: Callable[[], list[str]]  # sizes accepted by random:SIZE
    tokenizer: Callable[[], TextTokenizer]  # default tokenizer when a checkpoint ships none
    default_weights: str
    aliases: dict[str, Callable[[], Path]] = field(default_factory=dict)  # alias -> checkpoint dir
    default_size: str = "tiny"


@dataclass
class Weights:
    identity: str  # canonical description, stable across machines (never an absolute temp path)
    sha256: str
    hf_config: object  # a transformers PretrainedConfig
    state_dict: dict[str, torch.Tensor]  # reference names and layouts
    tokenizer: TextTokenizer
    source_dir: Path | None = None


def load_weights(arch: ArchSpec, spec: str | None, seed: int) -> Weights:
    spec = spec or arch.default_weights
    if spec == "random" or spec.startswith("random:"):
        return _random_weights(arch, spec.partition(":")[2] or arch.default_size, seed)
    if spec in arch.aliases:
        return _pretrained_weights(arch, str(arch.aliases[spec]()), identity=spec)
    if Path(spec).is_dir():
        return _pretrained_weights(arch, spec, identity=spec)
    looks_like_path = spec.startswith(("/", ".", "~")) or Path(spec).exists()
    if looks_like_path or spec.count("/") != 1:
        known = ", ".join(["random[:SIZE]", *arch.aliases])
        raise HarnessError(
            f"weights '{spec}' for {arch.name}: not a checkpoint directory, hub id (owner/name) or alias ({known})"
        )
    return _pretrained_weights(arch, spec, identity=spec)


def _random_weights(arch: ArchSpec, size: str, seed: int) -> Weights:
    if size not in arch.sizes():
        raise UnknownNameError(f"unknown {arch.name} size '{size}'; known sizes: {', '.join(arch.sizes())}")
    tokenizer = arch.tokenizer()
    config = arch.random_config(size, tokenizer)
    torch.manual_seed(seed)
    model = arch.hf_model_class(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Weights(f"random:{size}", tensor_sha256(state), config, state, tokenizer)


def _pretrained_weights(arch: ArchSpec, where: str, identity: str) -> Weights:
    try:
        with _quiet_transformers():  # mismatches are reported below, in one line, instead of a log table
            model, info = arch.hf_model_class.from_pretrained(
                where, output_loading_info=True, ignore_mismatched_sizes=True
            )
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HarnessError(f"cannot load {arch.name} weights '{where}': {first}") from e
    _check_loading_info(where, info)
    local = Path(where) if Path(where).is_dir() else None
    tokenizer = (tokenizer_from_dir(local) if local else None) or arch.tokenizer()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Weights(identity, tensor_sha256(state), model.config, state, tokenizer, local)


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _describe(key) -> str:
    if isinstance(key, tuple):  # (name, checkpoint shape, model shape)
        return f"{key[0]} {tuple(key[1])} vs expected {tuple(key[2])}" if len(key) == 3 else str(key)
    return str(key)


def _check_loading_info(where: str, info: dict) -> None:
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(_describe(k) for k in info.get(kind) or [])
        if keys:
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
    if problems:
        raise HarnessError(f"checkpoint '{where}' does not match the architecture ({'; '.join(problems)})")


def tensor_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
