"""`harness train`: next-token training of `gpt2-scratch` or `gpt2-hf`, with checkpoints and result rows.

The chain: parse the config -> tokenize the data -> build the model through the registry (both
implementations start from the same `Weights`) -> AdamW with warmup + cosine decay -> evaluate,
log rows, checkpoint -> final rows. Choices, stated once:

* Data. `tinyshakespeare` and any UTF-8 `PATH` are tokenized whole with GPT-2's BPE and split by
  position: the first 90% of the tokens train, the last 10% validate. `wikitext2` trains on the raw
  *valid* split and validates on the raw *test* split (the train split is not vendored), each article
  detokenized as the `ppl` task does and followed by <|endoftext|>.
* Batches. Training windows start at offsets drawn from a `torch.Generator` seeded with `seed`; its
  state is checkpointed, so a resumed run draws the same batches as an uninterrupted one. Validation
  uses the same `eval_batches` windows at every evaluation (a generator seeded with `seed + 1`).
* Weight decay applies to every parameter with two or more dimensions (the matmul weights and the
  embedding tables, `wte` being tied to the output head); biases and LayerNorm parameters are not
  decayed.
* Schedule. Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps`.
* Checkpoints (HF format, loadable with `GPT2LMHeadModel.from_pretrained(out)`) are written at every
  evaluation, at the end and on Ctrl-C. A non-finite loss stops training with an error and writes
  nothing, so the last good checkpoint is kept.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harness.adapter import Capability, ModelAdapter, ModelSpec
from harness.errors import HarnessError, UnknownNameError
from harness.results import Metric, ResultRow, ResultStore, now_iso, provenance
from harness.tokenizer import TextTokenizer
from harness.weights import Weights, load_weights, tensor_sha256

TASK = "train"
TASK_VERSION = "1.0"
DATA_DIR = Path(__file__).resolve().parent.parent / "tasks" / "data"
STATE_FILE = "train_state.pt"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HIGHER_IS_BETTER = {"train_loss": False, "val_loss": False, "val_perplexity": False, "tokens_per_second": True}


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of a run; each is a flag (`--batch-size 8`) and a `--set train.KEY=VALUE`."""

    steps: int = _f(1000, "optimizer steps; the cosine schedule ends here")
    batch_size: int = _f(8, "sequences per micro-batch")
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
    eval_batches: int = _f(20, "validation micro-batches per evaluation")
    log_interval: int = _f(10, "write a train_loss row (mean of the last N steps) every N steps")
    seed: int = _f(0, "initialisation, batch order and dropout")
    device: str = _f("cpu", "cpu or cuda")
    save_dtype: Literal["float32", "float16", "bfloat16"] = _f(
        "float32", "dtype of model.safetensors (config.json says float32: loading upcasts)"
    )

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "block_size",
            "grad_accum",
            "eval_interval",
            "eval_batches",
            "log_interval",
        ):
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
    results_dir: str = "results"


@dataclass
class TrainResult:
    train_losses: list[float]  # loss of step s at index s - 1
    val_losses: dict[int, float]  # step -> validation loss
    tokens_per_second: float
    out: Path


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenData:
    train: torch.Tensor  # 1-D int64 token ids
    val: torch.Tensor
    description: str


def load_data(spec: str, tokenizer: TextTokenizer) -> TokenData:
    """Token ids of a named corpus or a UTF-8 file, split as the module docstring states."""
    if spec == "wikitext2":
        return _wikitext2(tokenizer)
    path = DATA_DIR / "tinyshakespeare" / "input.txt" if spec == "tinyshakespeare" else Path(spec)
    if not path.is_file():
        raise HarnessError(f"--data {spec!r}: not tinyshakespeare, wikitext2 or an existing text file")
    ids = torch.tensor(_encode_file(str(path), tokenizer), dtype=torch.long)
    cut = int(0.9 * len(ids))
    return TokenData(ids[:cut], ids[cut:], f"{spec} (first 90% of tokens train, last 10% validate)")


_ENCODED: dict[tuple[str, str], list[int]] = {}  # (what, tokenizer name) -> ids: tests reuse them


def _encode_file(path: str, tokenizer: TextTokenizer) -> list[int]:
    key = (str(Path(path).resolve()), tokenizer.name)
    if key not in _ENCODED:
        try:
            _ENCODED[key] = tokenizer.encode(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise HarnessError(f"--data {path}: cannot read it as UTF-8 text ({e})") from e
    return _ENCODED[key]


def _wikitext2(tokenizer: TextTokenizer) -> TokenData:
    from tasks.ppl import detokenize, load_wikitext_documents

    def ids(split: str) -> torch.Tensor:
        key = (f"wikitext2:{split}", tokenizer.name)
        if key not in _ENCODED:
            docs = tokenizer.encode_batch([detokenize(d) for d in load_wikitext_documents(split)])
            _ENCODED[key] = [t for doc in docs for t in (*doc, tokenizer.eot_id)]
        return torch.tensor(_ENCODED[key], dtype=torch.long)

    return TokenData(ids("valid"), ids("test"), "wikitext2 (raw valid trains, raw test validates)")


def sample_batch(ids: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """(x, y), each (B, T): random windows of ids and the same windows shifted by one token."""
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x, y


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the optimizer step that takes `step` (0-based) updates to `step + 1`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# -- model ----------------------------------------------------------------------------------------


def build_model(run: TrainRun, cfg: TrainConfig, saved: dict | None = None) -> ModelAdapter:
    """The adapter to train, built as `harness run` builds it, so scratch and HF share weights."""
    from harness.registry import MODELS, load_plugins

    load_plugins()
    spec: ModelSpec = MODELS.get(run.model)
    weights = _resume_weights(spec, run, saved) if saved else initial_weights(spec, run, cfg)
    torch.manual_seed(cfg.seed)
    adapter = spec.build(_with_dropout(weights, cfg.dropout), cfg.device)
    adapter.require(Capability.TRAIN, task=TASK)
    if cfg.block_size > adapter.max_length:
        raise HarnessError(
            f"train.block_size={cfg.block_size} exceeds {run.model}'s context of "
            f"{adapter.max_length}; lower --block-size"
        )
    return adapter


def initial_weights(spec: ModelSpec, run: TrainRun, cfg: TrainConfig) -> Weights:
    if run.weights:
        if run.model_overrides:
            raise HarnessError("--set model.KEY=VALUE only applies to a random init (--size), not --weights")
        return load_weights(spec.arch, run.weights, cfg.seed)
    size = run.size or spec.arch.default_size
    if spec.arch.name != "gpt2":
        if run.model_overrides:
            raise HarnessError(f"--set model.KEY=VALUE is implemented for gpt2 only, not {spec.arch.name}")
        return load_weights(spec.arch, f"random:{size}", cfg.seed)
    return _random_gpt2(spec, size, cfg, dict(run.model_overrides))


def _random_gpt2(spec: ModelSpec, size: str, cfg: TrainConfig, overrides: dict[str, str]) -> Weights:
    """A seeded GPT-2 init at a named size; vocabulary from the tokenizer, context from block_size."""
    from reproductions import gpt2
    from tasks.base import coerce, config_fields

    if size not in gpt2.name_to_config:
        raise UnknownNameError(f"unknown gpt2 size '{size}'; known sizes: {', '.join(gpt2.name_to_config)}")
    fields = {
        k: v
        for k, v in config_fields(gpt2.GPT2Config).items()
        if k not in ("vocab_size", "block_size", "dropout", "bias")
    }
    for key in overrides:
        if key not in fields:
            known = ", ".join(f"model.{k}" for k in fields)
            raise UnknownNameError(f"unknown key 'model.{key}'; known keys: {known}")
    values = {k: coerce(v, fields[k], f"model.{k}") for k, v in overrides.items()}
    tokenizer = spec.arch.tokenizer()
    try:
        config = gpt2.GPT2Config.from_name(
            size, vocab_size=tokenizer.vocab_size, block_size=cfg.block_size, dropout=cfg.dropout, **values
        ).to_hf()
    except ValueError as e:
        raise HarnessError(f"gpt2 size {size} with {overrides}: {e}") from e
    config.bos_token_id = config.eos_token_id = tokenizer.eot_id
    torch.manual_seed(cfg.seed)
    state = {k: v.detach().clone() for k, v in spec.arch.hf_model_class(config).state_dict().items()}
    shown = ",".join(f"{k}={v}" for k, v in sorted({**values, "block_size": cfg.block_size}.items()))
    return Weights(f"random:{size}[{shown}]", tensor_sha256(state), config, state, tokenizer)


def _with_dropout(weights: Weights, rate: float) -> Weights:
    config = copy.deepcopy(weights.hf_config)
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(config, name):
            setattr(config, name, rate)
    return dataclasses.replace(weights, hf_config=config)


def _resume_weights(spec: ModelSpec, run: TrainRun, saved: dict) -> Weights:
    weights = load_weights(spec.arch, run.out, saved["config"]["seed"])
    state = saved.get("model_fp32") or weights.state_dict
    return dataclasses.replace(weights, identity=saved["init_identity"], sha256=saved["init_sha256"], state_dict=state)


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)  # fused: ~6x faster on CPU


def next_token_loss(adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = adapter.logits(x)  # (B, T, V); the scratch module returns a tensor, HF a .logits field
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.to(logits.device).reshape(-1))


# -- checkpoints ----------------------------------------------------------------------------------


def hf_state(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """The module's weights in the reference (GPT2LMHeadModel) names and layouts, detached."""
    return {k: v.detach() for k, v in adapter.reference_layout(dict(adapter.module.state_dict())).items()}


def save_model(out: Path, adapter: ModelAdapter, dtype: str) -> dict[str, torch.Tensor]:
    """config.json + model.safetensors (+ tokenizer.json); returns the fp32 HF-layout state."""
    from safetensors.torch import save_file

    state = hf_state(adapter)
    config = copy.deepcopy(adapter.weights.hf_config)
    tied = getattr(config, "tie_word_embeddings", False)
    tensors = {
        k: v.to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")
    }  # the tied head is wte
    config.dtype = "float32"  # transformers 5 loads with dtype="auto": this makes it upcast to fp32
    config.save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600
    adapter.tokenizer.backend.save(str(out / "tokenizer.json"))
    return state


def read_state(out: Path) -> dict:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise HarnessError(f"--resume: no {STATE_FILE} in '{out}'; start without --resume")
    return torch.load(path, map_location="cpu", weights_only=True)


# -- the loop -------------------------------------------------------------------------------------


class Trainer:
    """One training run: model, data, optimizer, RNG state, progress, rows and checkpoints."""

    def __init__(
        self, run: TrainRun, cfg: TrainConfig, console: Console | None = None, saved: dict | None = None
    ) -> None:
        self.run, self.cfg = run, cfg
        self.console = console or Console(stderr=True)
        self.out = Path(run.out)
        self.adapter = build_model(run, cfg, saved)
        self.data = load_data(run.data, self.adapter.tokenizer)
        _check_data(self.data, cfg)
        self.optimizer = make_optimizer(self.adapter.module, cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step, self.train_losses, self.val_losses = 0, [], {}
        self.init_identity, self.init_sha = self.adapter.weights.identity, self.adapter.weights.sha256
        self.train_id = f"{now_iso()}-{uuid.uuid4().hex[:6]}"
        self.saved_step: int | None = None
        if saved:
            self._restore(saved)
        self.store = ResultStore(run.results_dir)
        self.train_seconds, self.tokens_done = 0.0, 0
        self._rng = self._rng_state()

    # state -------------------------------------------------------------------------------------
    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor, list]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return self.generator.get_state(), torch.get_rng_state(), cuda

    def _set_rng(self, rng: tuple[torch.Tensor, torch.Tensor, list]) -> None:
        self.generator.set_state(rng[0])
        torch.set_rng_state(rng[1])
        if rng[2]:
            torch.cuda.set_rng_state_all(rng[2])

    def _restore(self, saved: dict) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self._set_rng((saved["generator"], saved["torch_rng"], saved.get("cuda_rng", [])))
        self.step, self.saved_step = saved["step"], saved["step"]
        self.train_losses = list(saved["train_losses"])
        self.val_losses = {int(k): v for k, v in saved["val_losses"].items()}
        self.init_identity, self.init_sha = saved["init_identity"], saved["init_sha256"]
        self.train_id = saved["train_id"]

    def save(self) -> None:
        """Checkpoint the state after `self.step` updates (RNG as it was when that step ended)."""
        self.out.mkdir(parents=True, exist_ok=True)
        state = save_model(self.out, self.adapter, self.cfg.save_dtype)
        gen, cpu, cuda = self._rng
        payload = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "generator": gen,
            "torch_rng": cpu,
            "cuda_rng": cuda,
            "config": asdict(self.cfg),
            "run": asdict(self.run),
            "train_losses": self.train_losses,
            "val_losses": self.val_losses,
            "train_id": self.train_id,
            "init_identity": self.init_identity,
            "init_sha256": self.init_sha,
        }
        if self.cfg.save_dtype != "float32":  # exact resume needs the fp32 weights
            payload["model_fp32"] = {k: v.to("cpu", torch.float32).clone() for k, v in state.items()}
        torch.save(payload, self.out / f"{STATE_FILE}.tmp")
        os.replace(self.out / f"{STATE_FILE}.tmp", self.out / STATE_FILE)
        self.saved_step = self.step

    # steps -------------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns their mean loss."""
        cfg, module = self.cfg, self.adapter.module
        module.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        total = 0.0
        for _ in range(cfg.grad_accum):
            x, y = sample_batch(self.data.train, cfg.batch_size, cfg.block_size, self.generator)
            loss = next_token_loss(self.adapter, x.to(cfg.device), y.to(cfg.device))
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            raise HarnessError(self._nan_message(total))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _nan_message(self, loss: float) -> str:
        kept = (
            f"the last good checkpoint (step {self.saved_step}) in '{self.out}' is kept"
            if self.saved_step is not None
            else "no checkpoint had been written yet"
        )
        return f"train: loss became {loss} at step {self.step + 1}; stopped, {kept}; try a lower --lr"

    @torch.no_grad()
    def evaluate(self) -> float:
        cfg = self.cfg
        self.adapter.module.eval()
        generator = torch.Generator().manual_seed(cfg.seed + 1)  # the same windows every time
        losses = []
        for _ in range(cfg.eval_batches):
            x, y = sample_batch(self.data.val, cfg.batch_size, cfg.block_size, generator)
            losses.append(next_token_loss(self.adapter, x.to(cfg.device), y.to(cfg.device)).item())
        self.adapter.module.train()
        return sum(losses) / len(losses)

    # rows --------------------------------------------------------------------------------------
    def write(self, metric: str, value: float, **extra: Any) -> None:
        m = Metric(
            metric,
            float(value),
            HIGHER_IS_BETTER[metric],
            n=None,
            extra={"step": self.step, "train_id": self.train_id, "out": str(self.run.out), **extra},
        )
        self.store.append(self._row(m))

    def _row(self, m: Metric) -> ResultRow:
        prov = provenance()
        config = {
            "train": asdict(self.cfg),
            "data": self.run.data,
            "init": self.init_identity,
            "model_overrides": dict(self.run.model_overrides),
            "params": _num_params(self.adapter.module),
        }
        subtask = self.run.data if self.run.data in ("tinyshakespeare", "wikitext2") else "file"
        return ResultRow(
            model=self.adapter.name,
            weights=self.init_identity,
            weights_sha256=self.init_sha,
            task=TASK,
            task_version=TASK_VERSION,
            subtask=subtask,
            metric=m.metric,
            value=m.value,
            n=m.n,
            stderr=None,
            higher_is_better=m.higher_is_better,
            config=config,
            seed=self.cfg.seed,
            run_id=self.store.run_id,
            created_at=now_iso(),
            git_sha=prov["git_sha"],
            git_dirty=prov["git_dirty"],
            harness_version=prov["harness_version"],
            torch_version=prov["torch_version"],
            transformers_version=prov["transformers_version"],
            device=str(self.adapter.device),
            wall_seconds=round(self.train_seconds, 3),
            extra=m.extra,
        )

    def log_val(self) -> float:
        loss = self.evaluate()
        self.val_losses[self.step] = loss
        self.write("val_loss", loss)
        recent = self.train_losses[-self.cfg.log_interval :]
        train = f"train loss {sum(recent) / len(recent):.4f}, " if recent else ""
        self.console.print(
            f"step {self.step}: {train}val loss {loss:.4f}, {self._tps():,.0f} tokens/s", highlight=False, markup=False
        )  # a plain line: readable in CI logs too
        return loss

    def log_train(self) -> None:
        k = self.step % self.cfg.log_interval or self.cfg.log_interval
        recent = self.train_losses[-k:]
        self.write(
            "train_loss", sum(recent) / len(recent), steps_averaged=len(recent), lr=lr_at(self.step - 1, self.cfg)
        )

    # the run -----------------------------------------------------------------------------------
    def fit(self, callback: Callable[[int, ModelAdapter], None] | None = None) -> TrainResult:
        """Train until cfg.steps; callback(step, adapter) runs before each step (tests inject faults)."""
        self._announce()
        if self.step == 0:
            self.log_val()
        try:
            with _progress(self.console) as progress:
                bar = progress.add_task(
                    f"train {self.adapter.name}",
                    total=self.cfg.steps,
                    completed=self.step,
                    loss=float("nan"),
                    lr=0.0,
                    tps=0.0,
                )
                while self.step < self.cfg.steps:
                    if callback is not None:
                        callback(self.step, self.adapter)
                    self._one_step(progress, bar)
            return self._finish()
        except KeyboardInterrupt:
            self.save()
            self.console.print(
                f"interrupted after step {self.step}; checkpoint in '{self.out}' (continue with --resume)", markup=False
            )
            raise

    def _one_step(self, progress: Progress, bar) -> None:
        start = time.perf_counter()
        loss = self.train_step()
        self.step += 1
        self._rng = self._rng_state()
        self.train_seconds += time.perf_counter() - start
        self.tokens_done += self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum
        self.train_losses.append(loss)
        progress.update(bar, completed=self.step, loss=loss, lr=lr_at(self.step - 1, self.cfg), tps=self._tps())
        if self.step % self.cfg.log_interval == 0 or self.step == self.cfg.steps:
            self.log_train()
        if self.step % self.cfg.eval_interval == 0 and self.step < self.cfg.steps:
            self.log_val()
            self.save()

    def _tps(self) -> float:
        return self.tokens_done / self.train_seconds if self.train_seconds else 0.0

    def _finish(self) -> TrainResult:
        if self.step not in self.val_losses:
            self.log_val()
        val = self.val_losses[self.step]
        self.write("tokens_per_second", self._tps(), tokens=self.tokens_done, seconds=round(self.train_seconds, 3))
        self.write("val_perplexity", math.exp(val), val_loss=val)
        self.save()
        self.console.print(
            f"done: step {self.step}, val loss {val:.4f} (perplexity {math.exp(val):.2f}), "
            f"{self._tps():.0f} tokens/s; checkpoint -> {self.out}; rows -> {self.store.path}",
            markup=False,
        )
        return TrainResult(self.train_losses, self.val_losses, self._tps(), self.out)

    def _announce(self) -> None:
        n, d = _num_params(self.adapter.module), self.data
        self.console.print(
            f"train {self.adapter.name} ({n:,} parameters, init {self.init_identity}) on {d.description}: "
            f"{len(d.train):,} train / {len(d.val):,} val tokens; step {self.step} of {self.cfg.steps}",
            highlight=False,
            markup=False,
        )


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_data(data: TokenData, cfg: TrainConfig) -> None:
    for name, ids in (("train", data.train), ("validation", data.val)):
        if len(ids) <= cfg.block_size + 1:
            raise HarnessError(
                f"the {name} split has {len(ids)} tokens, too few for block_size "
                f"{cfg.block_size}; use more text or a smaller --block-size"
            )


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def train(
    run: TrainRun,
    cfg: TrainConfig,
    console: Console | None = None,
    resume: bool = False,
    callback: Callable[[int, ModelAdapter], None] | None = None,
) -> TrainResult:
    """Train (or continue, with resume=True, the run checkpointed in run.out) and return the curves."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError("--device cuda: no CUDA device is available here; use --device cpu")
    if not resume and (Path(run.out) / STATE_FILE).exists():
        raise HarnessError(f"'{run.out}' already holds a training checkpoint; pass --resume or another --out")
    saved = read_state(Path(run.out)) if resume else None
    return Trainer(run, cfg, console, saved).fit(callback)


# -- command line ---------------------------------------------------------------------------------


def make_train_config(base: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """base with string overrides coerced to each field's declared type."""
    from tasks.base import coerce, config_fields

    fields = config_fields(TrainConfig)
    for key in overrides:
        if key not in fields:
            known = ", ".join(f"train.{k}" for k in fields)
            raise UnknownNameError(f"unknown key 'train.{key}'; known keys: {known}")
    return dataclasses.replace(base, **{k: coerce(v, fields[k], f"train.{k}") for k, v in overrides.items()})


def split_overrides(items: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """["train.lr=1e-3", "model.n_embd=128"] -> ({"lr": "1e-3"}, {"n_embd": "128"})."""
    train_kv: dict[str, str] = {}
    model_kv: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        scope, dot, name = key.partition(".")
        if not eq or not dot or scope not in ("train", "model") or not name:
            raise HarnessError(f"--set {item!r}: expected train.KEY=VALUE or model.KEY=VALUE (train.lr=3e-4)")
        (train_kv if scope == "train" else model_kv)[name] = value
    return train_kv, model_kv


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train gpt2-scratch or gpt2-hf; HF-format checkpoints and result rows",
        description="Train a causal LM from a random init (--size) or from --weights.",
    )
    p.add_argument("--model", help="gpt2-scratch or gpt2-hf (any model that can 'train')")
    p.add_argument("--size", help="named size for a random init (default: the architecture's, gpt2: tiny)")
    p.add_argument("--weights", help="start from these weights: random[:SIZE] | alias | HF-format dir")
    p.add_argument("--data", help="tinyshakespeare | wikitext2 | PATH to a UTF-8 text file")
    p.add_argument("--out", required=True, help="checkpoint directory (config.json, model.safetensors, train_state.pt)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    p.add_argument("--results-dir", default=None, help="where result rows are appended (default results/)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SCOPE.KEY=VALUE",
        help="train.KEY=VALUE: a hyperparameter; model.KEY=VALUE: a GPT2Config field of a random "
        "init, e.g. model.n_embd=128 (repeatable)",
    )
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"train_{f.name}",
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} (default {_show(f.default)})",
        )
    p.set_defaults(func=cmd_train)


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def run_from_args(args: argparse.Namespace, saved: dict | None) -> tuple[TrainRun, TrainConfig]:
    train_kv, model_kv = split_overrides(args.overrides)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f"train_{f.name}")
        if value is not None:
            train_kv[f.name] = value
    base = TrainConfig(**_tuples(saved["config"])) if saved else TrainConfig()
    cfg = make_train_config(base, train_kv)
    if saved:
        return _resumed_run(args, saved, model_kv), cfg
    if not args.model or not args.data:
        raise HarnessError("harness train needs --model and --data (or --resume with an existing --out)")
    run = TrainRun(
        model=args.model,
        data=args.data,
        out=args.out,
        size=args.size,
        weights=args.weights,
        model_overrides=tuple(sorted(model_kv.items())),
        results_dir=args.results_dir or "results",
    )
    return run, cfg


def _tuples(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _resumed_run(args: argparse.Namespace, saved: dict, model_kv: dict[str, str]) -> TrainRun:
    pairs = tuple(tuple(kv) for kv in saved["run"]["model_overrides"])
    run = TrainRun(**{**saved["run"], "model_overrides": pairs})
    for name in ("model", "data", "size", "weights"):
        given, saved_value = getattr(args, name), getattr(run, name)
        if given is not None and given != saved_value:
            raise HarnessError(f"--resume: --{name} {given} differs from the checkpoint's ({saved_value})")
    if model_kv:
        raise HarnessError("--resume: the model's shape is fixed by the checkpoint; drop --set model.*")
    return dataclasses.replace(run, out=args.out, results_dir=args.results_dir or run.results_dir)


def cmd_train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    saved = read_state(Path(args.out)) if args.resume else None
    run, cfg = run_from_args(args, saved)
    train(run, cfg, resume=args.resume)
    return 0


# -- report ---------------------------------------------------------------------------------------


def train_report_section(df: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
    """Markdown for `harness report`: loss curves (PNG), one line per training run, scratch-vs-HF deltas."""
    rows = df[df["task"] == TASK] if "task" in df else df
    if rows.empty:
        return ""
    runs = _runs_table(rows)
    path = _plot_curves(rows, Path(fig_dir))
    lines = ["### Training runs", "", runs, "", f"![training curves]({_rel(path, Path(report_dir))})", ""]
    parity = _training_parity(rows)
    if parity:
        lines += ["### Training parity (scratch vs reference, same init, same batches)", "", parity, ""]
    return "\n".join(lines)


def _train_id(rows: pd.DataFrame) -> pd.Series:
    return rows["extra"].map(lambda e: e.get("train_id", "") if isinstance(e, dict) else "")


def _step(rows: pd.DataFrame) -> pd.Series:
    return rows["extra"].map(lambda e: int(e.get("step", 0)) if isinstance(e, dict) else 0)


def _runs_table(rows: pd.DataFrame) -> str:
    lines = [
        "| model | init | data | steps | final val loss | val perplexity | tokens/s | recipe |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, run in rows.assign(train_id=_train_id(rows)).groupby("train_id", sort=True):
        last = run.iloc[-1]
        value = _last_value_getter(run)
        t = last["config"].get("train", {}) if isinstance(last["config"], dict) else {}
        recipe = ", ".join(
            f"{k}={_show(tuple(v) if isinstance(v, list) else v)}"
            for k, v in t.items()
            if k
            in (
                "steps",
                "batch_size",
                "block_size",
                "grad_accum",
                "lr",
                "min_lr",
                "warmup_steps",
                "weight_decay",
                "dropout",
            )
        )
        lines.append(
            f"| {last['model']} | `{last['weights']}` | {last['config'].get('data', '')} | "
            f"{_step(run).max()} | {value('val_loss'):.4f} | {value('val_perplexity'):.2f} | "
            f"{value('tokens_per_second'):.0f} | {recipe} |"
        )
    return "\n".join(lines)


def _last_value_getter(run: pd.DataFrame) -> Callable[[str], float]:
    def value(metric: str) -> float:
        values = run[run["metric"] == metric]["value"]
        return float(values.iloc[-1]) if len(values) else float("nan")

    return value


def _plot_curves(rows: pd.DataFrame, fig_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows.assign(train_id=_train_id(rows), step=_step(rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), squeeze=False)
    for ax, metric in zip(axes[0], ("train_loss", "val_loss")):
        for train_id, run in rows[rows["metric"] == metric].groupby("train_id", sort=True):
            run = run.sort_values("step")
            style = "-" if "scratch" in run["model"].iloc[0] else "--"
            label = f"{run['model'].iloc[0]} on {run['subtask'].iloc[0]} ({train_id[-6:]})"
            ax.plot(run["step"], run["value"], style, label=label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / "train_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _training_parity(rows: pd.DataFrame) -> str:
    """max |train_loss difference| over shared steps for scratch/HF runs with the same init and recipe."""
    losses = rows[rows["metric"] == "train_loss"].assign(step=_step(rows), train_id=_train_id(rows))
    parts = losses["model"].str.rpartition("-")
    losses = losses.assign(
        recipe=losses["config"].map(lambda c: repr(sorted(c.get("train", {}).items()))), arch=parts[0], impl=parts[2]
    )
    lines = []
    for (arch, sha, _), group in losses.groupby(["arch", "weights_sha256", "recipe"], sort=True):
        curves = {impl: g.groupby("step")["value"].last() for impl, g in group.groupby("impl")}
        if "scratch" in curves and "hf" in curves:
            both = curves["scratch"].index.intersection(curves["hf"].index)
            diff = (curves["scratch"][both] - curves["hf"][both]).abs().max() if len(both) else float("nan")
            lines.append(f"| {arch} | `{sha[:12]}` | {len(both)} | {diff:.2e} |")
    head = ["| arch | init sha256 | steps compared | max abs train_loss diff |", "|---|---|---|---|"]
    return "\n".join(head + lines) if lines else ""


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.as_posix()
