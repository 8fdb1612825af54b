"""The training loop: AdamW with warmup + cosine decay on the next-token loss, and the `Trainer` that
runs it step by step, evaluates, writes result rows (through `harness.api.make_row`) and checkpoints,
as the package docstring states. `train()` is the entry point. Under torchrun the Trainer runs on
every rank (harness/train/distributed.py): each computes its share of every batch, and rank 0 alone
logs, writes rows, checkpoints and TensorBoard events.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from harness.api import (
    HarnessError,
    Metric,
    ModelAdapter,
    ResultStore,
    Trainable,
    check_device,
    make_row,
    now_iso,
)
from harness.train.checkpoint import STATE_FILE, read_state, save_model, write_state
from harness.train.config import TASK, TASK_VERSION, TrainConfig, TrainResult, TrainRun
from harness.train.data import check_data, load_data, sample_batch
from harness.train.distributed import World, rank0_speaks, start, stop, torchrun_world, wrap
from harness.train.model import build_model

HIGHER_IS_BETTER = {"train_loss": False, "val_loss": False, "val_perplexity": False, "tokens_per_second": True}
NAMED_DATA = ("tinyshakespeare", "wikitext2")  # a row's subtask; any other --data is "file"
Callback = Callable[[int, ModelAdapter], None]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the optimizer step that takes `step` (0-based) updates to `step + 1`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)  # fused: ~6x faster on CPU


def next_token_loss(
    model: Trainable, x: torch.Tensor, y: torch.Tensor, module: torch.nn.Module | None = None
) -> torch.Tensor:
    """Mean cross-entropy of next tokens; `module` is the adapter's own or its DDP wrapper."""
    logits = model.forward(module if module is not None else model.module, x)  # (B, T, V) on every position
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.to(logits.device).reshape(-1))


def train(
    run: TrainRun,
    cfg: TrainConfig,
    console: Console | None = None,
    resume: bool = False,
    callback: Callback | None = None,
) -> TrainResult:
    """Train (or continue, with resume=True, the run checkpointed in run.out) and return the curves."""
    world = torchrun_world()  # from torchrun's environment; the process group is joined below
    try:
        with rank0_speaks():
            check_device(cfg.device)
            if not resume and (Path(run.out) / STATE_FILE).exists():
                raise HarnessError(f"'{run.out}' already holds a training checkpoint; pass --resume or another --out")
            if run.tensorboard:
                summary_writer_class()  # refuse a missing package before any weights load
            saved = read_state(Path(run.out)) if resume else None
            world.check_batch(cfg.batch_size)
            world = start(cfg.device)
            return Trainer(run, cfg, console, saved, world).fit(callback)
    finally:
        stop(world)


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or a one-line error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise HarnessError(
            "--tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install 'lm-repro-harness[tensorboard]')"
        ) from None
    return SummaryWriter


class Trainer:
    """One training run: model, data, optimizer, RNG state, progress, rows and checkpoints."""

    def __init__(
        self,
        run: TrainRun,
        cfg: TrainConfig,
        console: Console | None = None,
        saved: dict | None = None,
        world: World | None = None,
    ) -> None:
        self.run, self.cfg, self.world = run, cfg, world or World()
        self.console = console or Console(stderr=True)
        if not self.world.is_main:  # rank 0 alone speaks
            self.console = Console(file=io.StringIO())
        self.out = Path(run.out)
        self.adapter = build_model(run, cfg, saved)
        self.model: Trainable = self.adapter.require(Trainable, task=TASK)
        self.data = load_data(run.data, self.adapter.tokenizer)
        check_data(self.data, cfg.block_size)
        self.optimizer = make_optimizer(self.adapter.module, cfg)
        self.trained = wrap(self.adapter.module, self.world, cfg.device)  # DDP under torchrun
        if self.world.rank:  # dropout: each rank its own stream (rank 0 keeps a single process's)
            torch.manual_seed(cfg.seed + 7919 * self.world.rank)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step, self.train_losses, self.val_losses = 0, [], {}
        self.init = self.adapter.weights  # identity and sha256 of the run's initial weights (kept on resume)
        self.train_id = f"{now_iso()}-{uuid.uuid4().hex[:6]}"
        self.saved_step: int | None = None
        if saved:
            self._restore(saved)
        self.store = ResultStore(run.results_dir) if self.world.is_main else None
        self.train_seconds, self.tokens_done = 0.0, 0
        self._rng = self._rng_state()
        self.tensorboard = self._summary_writer()

    def _summary_writer(self):
        if not (self.run.tensorboard and self.world.is_main):
            return None
        # purge_step: events a crashed run wrote after its last checkpoint are hidden, not doubled
        return summary_writer_class()(log_dir=self.run.tensorboard, purge_step=self.step or None)

    def _scalar(self, tag: str, value: float) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, self.step)

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
        ranks = saved.get("torch_rng_ranks") or [saved["torch_rng"]]
        if len(ranks) == self.world.size:  # dropout continues exactly where each rank stopped
            torch.set_rng_state(ranks[self.world.rank])
        elif self.world.rank:  # another world size: rank 0 continues, the others start fresh streams
            torch.manual_seed(self.cfg.seed + 7919 * self.world.rank + saved["step"])
        self.step, self.saved_step = saved["step"], saved["step"]
        self.train_losses = list(saved["train_losses"])
        self.val_losses = {int(k): v for k, v in saved["val_losses"].items()}
        self.train_id = saved["train_id"]  # the init's identity came back with the weights (model.py)

    def save(self, collective: bool = True) -> None:
        """Checkpoint the state after `self.step` updates (RNG as it was when that step ended). Under
        torchrun every rank calls it (their dropout RNG states are gathered) and rank 0 writes; on Ctrl-C
        (collective=False) no rank waits for another and only rank 0's RNG state is kept."""
        ranks = self.world.gather(self._rng[1]) if collective else []
        if not self.world.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = save_model(self.out, self.adapter, self.cfg.save_dtype)
        payload = self._payload()
        if self.world.distributed and ranks:
            payload["torch_rng_ranks"] = ranks
        if self.cfg.save_dtype != "float32":  # exact resume needs the fp32 weights
            payload["model_fp32"] = {k: v.to("cpu", torch.float32).clone() for k, v in state.items()}
        write_state(self.out, payload)
        self.saved_step = self.step

    def _payload(self) -> dict[str, Any]:
        gen, cpu, cuda = self._rng
        return {
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
            "init_identity": self.init.identity,
            "init_sha256": self.init.sha256,
        }

    # steps -------------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns their mean loss (over all ranks)."""
        cfg, module = self.cfg, self.adapter.module
        module.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        total, rows = 0.0, self.world.rows(cfg.batch_size)
        for micro in range(cfg.grad_accum):
            x, y = sample_batch(self.data.train, cfg.batch_size, cfg.block_size, self.generator, rows)
            with self._sync(last=micro == cfg.grad_accum - 1):
                loss = next_token_loss(self.model, x.to(cfg.device), y.to(cfg.device), self.trained)
                (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        total = self.world.mean(total, cfg.device)
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            raise HarnessError(self._nan_message(total))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _sync(self, last: bool):
        """DDP all-reduces gradients on the last micro-batch of a step only (`no_sync` before it)."""
        if self.trained is self.adapter.module or last:
            return contextlib.nullcontext()
        return self.trained.no_sync()

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
        losses, rows = [], self.world.rows(cfg.batch_size)
        for _ in range(cfg.eval_batches):
            x, y = sample_batch(self.data.val, cfg.batch_size, cfg.block_size, generator, rows)
            losses.append(next_token_loss(self.model, x.to(cfg.device), y.to(cfg.device)).item())
        self.adapter.module.train()
        return self.world.mean(sum(losses) / len(losses), cfg.device)

    # rows --------------------------------------------------------------------------------------
    def write(self, metric: str, value: float, **extra: Any) -> None:
        if self.store is None:  # not rank 0
            return
        m = Metric(
            metric,
            float(value),
            HIGHER_IS_BETTER[metric],
            subtask=self.run.data if self.run.data in NAMED_DATA else "file",
            extra={
                "step": self.step,
                "train_id": self.train_id,
                "out": str(self.run.out),
                "world_size": self.world.size,
                **extra,
            },
        )
        row = make_row(
            m,
            model=self.adapter.name,
            weights=self.init,
            task=TASK,
            task_version=TASK_VERSION,
            config=self._row_config(),
            seed=self.cfg.seed,
            run_id=self.store.run_id,
            device=str(self.adapter.device),
            wall_seconds=self.train_seconds,
        )
        self.store.append(row)

    def _row_config(self) -> dict[str, Any]:
        return {
            "train": asdict(self.cfg),
            "data": self.run.data,
            "init": self.init.identity,
            "model_overrides": dict(self.run.model_overrides),
            "params": num_params(self.adapter.module),
        }

    def log_val(self) -> float:
        loss = self.evaluate()
        self.val_losses[self.step] = loss
        self.write("val_loss", loss)
        self._scalar("val_loss", loss)
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
    def fit(self, callback: Callback | None = None) -> TrainResult:
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
            self.save(collective=False)
            self._close_tensorboard()
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
        self._scalar("train_loss", loss)
        self._scalar("lr", lr_at(self.step - 1, self.cfg))
        self._scalar("tokens_per_second", self._tps())
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
        self._close_tensorboard()
        self.console.print(
            f"done: step {self.step}, val loss {val:.4f} (perplexity {math.exp(val):.2f}), "
            f"{self._tps():.0f} tokens/s; checkpoint -> {self.out}; rows -> {self.store and self.store.path}",
            markup=False,
        )
        return TrainResult(self.train_losses, self.val_losses, self._tps(), self.out)

    def _close_tensorboard(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _announce(self) -> None:
        n, d = num_params(self.adapter.module), self.data
        self.console.print(
            f"train {self.adapter.name} ({n:,} parameters, init {self.init.identity}) on {d.description}: "
            f"{len(d.train):,} train / {len(d.val):,} val tokens; step {self.step} of {self.cfg.steps}"
            + (f"; {self.world.size} ranks, each {self.cfg.batch_size // self.world.size} of every batch's "
               f"{self.cfg.batch_size} sequences" if self.world.distributed else ""),
            highlight=False,
            markup=False,
        )
        if self.cfg.warmup_steps >= self.cfg.steps:
            self.console.print(
                f"warning: warmup_steps={self.cfg.warmup_steps} >= steps={self.cfg.steps}: the whole run is "
                "warmup and the learning rate never decays; lower --warmup-steps",
                highlight=False,
                markup=False,
            )


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
