"""Resolve `--weights` into one set of tensors shared by a scratch model and its reference.

Accepted forms (per architecture):
  random[:SIZE]    seeded init of the reference class at a named size (the arch's default size if omitted)
  <alias>          a checkpoint shipped with the project or a package (e.g. `default`, `minilm`,
                   `smollm2`: a GGUF file converted once into an HF-format directory under the cache)
  DIR              an HF-format directory: config.json + model.safetensors / shards / pytorch_model.bin
  owner/name       a Hugging Face hub id (needs network or a populated HF cache)

The tensors are kept in the reference implementation's names and layouts;
scratch models convert them through their tested name map. `sha256` hashes
names, dtypes, shapes and bytes, so two results with the same hash were
computed from bit-identical weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.api.errors import HarnessError, UnknownNameError, first_line
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
    local = Path(spec).expanduser()  # `~/ckpt` quoted past the shell, too
    if local.is_dir():
        if hasattr(arch.hf_model_class, "config_class"):  # a transformers model (not e.g. a tokenizer's own files)
            check_checkpoint_dir(local, spec)
        return _pretrained_weights(arch, str(local), identity=spec)
    known = ", ".join(["random[:SIZE]", *arch.aliases])
    if _looks_like_path(spec):
        what = "a file, not a checkpoint directory" if Path(spec).expanduser().exists() else "no such directory"
        raise HarnessError(f"weights '{spec}' for {arch.name}: {what}; pass an HF-format checkpoint directory "
                           f"(config.json + weights), a hub id (owner/name) or an alias ({known})")
    if spec.count("/") != 1:
        raise HarnessError(
            f"weights '{spec}' for {arch.name}: not a checkpoint directory, hub id (owner/name) or alias ({known})"
        )
    return _pretrained_weights(arch, spec, identity=spec)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_checkpoint_dir(where: Path, spec: str) -> None:
    """Refuse, in one line and before transformers reads it, a local checkpoint directory without a
    parseable config.json, without a weights file, or with a truncated or corrupt .safetensors file."""
    fix = "pass an HF-format checkpoint directory (config.json + model.safetensors), e.g. one `harness train` wrote"
    config = where / "config.json"
    if not config.is_file():
        raise HarnessError(f"weights '{spec}': no config.json in the directory; {fix}")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HarnessError(f"weights '{spec}': config.json is not valid JSON ({first_line(e)}); {fix}") from e
    if not any((where / name).is_file() for name in WEIGHT_FILES):
        raise HarnessError(f"weights '{spec}': no weights file ({', '.join(WEIGHT_FILES)}) in the directory; {fix}")
    for file in sorted(where.glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            raise HarnessError(f"weights '{spec}': {file.name} is {problem}; copy or write the checkpoint again")


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file's framing, None if nothing: 8 bytes of header length, a
    JSON header, then every tensor's bytes (github.com/huggingface/safetensors, "Format")."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, no header)"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"truncated or not a safetensors file (a header of {n} bytes in a file of {size})"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "corrupt (its header is not JSON)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and "data_offsets" in t]
    if ends and 8 + n + max(ends) > size:
        return f"truncated ({size} bytes, its header needs {8 + n + max(ends)})"
    return None


def _looks_like_path(spec: str) -> bool:
    """A spec that is not an existing directory, alias or random[:SIZE] is a hub id only in the form
    `owner/name`; it is a (mistyped) local path when it starts with `/`, `.` or `~`, names something
    that exists (a file), has more than one `/` or a backslash, or when its first component is a local
    directory (`runs/shakespear` next to a `runs/` folder)."""
    if spec.startswith(("/", ".", "~")) or "\\" in spec or os.sep in spec.replace("/", "", 1):
        return True
    if Path(spec).exists():
        return True
    return spec.count("/") == 1 and Path(spec.partition("/")[0]).is_dir()


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
        first = first_line(e)
        if not Path(where).is_dir() and _offline():
            raise HarnessError(f"weights '{where}': not (completely) in the local Hugging Face cache ({_hub_cache()}) "
                               "and HF_HUB_OFFLINE is set: download it once with a network, or pass a local "
                               f"checkpoint directory (transformers: {first})") from e
        raise HarnessError(f"cannot load {arch.name} weights '{where}': {first}") from e
    _check_loading_info(where, info)
    local = Path(where) if Path(where).is_dir() else _cached_snapshot(where)
    tokenizer = (tokenizer_from_dir(local) if local else None) or arch.tokenizer()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Weights(identity, tensor_sha256(state), model.config, state, tokenizer, local)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot directory a hub id was just loaded from, so its tokenizer.json is used too."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    return Path(config).parent if isinstance(config, str) else None


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


def cache_root() -> Path:
    """Where converted checkpoints are kept: $HARNESS_CACHE, else ~/.cache/lm-repro-harness."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "lm-repro-harness")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_checkpoint(gguf: Path, model_class: Callable[..., torch.nn.Module], name: str) -> Path:
    """An HF-format directory (config.json, model.safetensors, tokenizer files, source.json with the
    GGUF file's SHA-256) converted once from a GGUF file by transformers' dequantising loader
    (`from_pretrained(dir, gguf_file=...)`: quantized blocks -> fp32) and cached under `cache_root()`,
    keyed by the file's hash. transformers refuses to `save_pretrained` a GGUF-loaded model, so the
    tensors are written with safetensors directly (a tied head is stored once, as transformers does)."""
    digest = file_sha256(gguf)
    out = cache_root() / f"{name}-{digest[:16]}"
    if (out / "model.safetensors").is_file():
        return out
    print(f"converting {gguf.name} once into {out} (a minute) ...", file=sys.stderr)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert_gguf(gguf, model_class, tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}, indent=1) + "\n")
        tmp.replace(out)
    except OSError as e:
        raise HarnessError(f"cannot write the converted checkpoint to '{out}': {e.strerror or e}; "
                           "set HARNESS_CACHE to a writable directory") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_gguf(gguf: Path, model_class: Callable[..., torch.nn.Module], out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    with _quiet_transformers():
        model = model_class.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.mkdir(parents=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):  # the fp32 copy is not quantized
        del model.config.quantization_config
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
