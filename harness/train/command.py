"""The `harness train` command line: its flags (one per `TrainConfig` field, plus `--set`), the run
they describe (a new one, or the one checkpointed in `--out` with `--resume`), and `cmd_train`.
The training itself is `harness.train.loop.train`; the package docstring states its choices.
torch and the loop are imported only when the command runs, so `harness list` and `--help` stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from harness.api import HarnessError
from harness.api.store import DEFAULT_RESULTS_DIR
from harness.train.config import (
    SCALED_DEFAULTS,
    TrainConfig,
    TrainRun,
    make_train_config,
    show,
    sized_to_steps,
    split_overrides,
)

EPILOG = """batch sizes are global: under `torchrun --nproc_per_node=N -m harness train ...` each of the N ranks
takes batch_size / N sequences of every micro-batch, so 1 or N ranks train on the same sequences
(docs/scale-out.md). Rank 0 alone logs, writes rows, checkpoints and TensorBoard events."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train gpt2-scratch or gpt2-hf; HF-format checkpoints and result rows",
        description="Train a causal LM from a random init (--size) or from --weights.",
        epilog=EPILOG,
    )
    p.add_argument("--model", help="gpt2-scratch or gpt2-hf (any model that can 'train')")
    p.add_argument("--size", help="named size for a random init (default: the architecture's, gpt2: tiny)")
    p.add_argument("--weights", help="start from these weights: random[:SIZE] | alias | HF-format dir")
    p.add_argument("--data", help="tinyshakespeare | wikitext2 | PATH to a UTF-8 text file")
    p.add_argument("--out", required=True, help="checkpoint directory (config.json, model.safetensors, train_state.pt)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    p.add_argument("--results-dir", default=None,
                   help=f"where result rows are appended (default {DEFAULT_RESULTS_DIR}/, which git ignores)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=None,
        help="also write TensorBoard event files here: loss, lr, tokens/s, val loss (pip install tensorboard)",
    )
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
            help=f"{f.metadata['help']} (default {SCALED_DEFAULTS.get(f.name, show(f.default))})",
        )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from harness.train.checkpoint import read_state
    from harness.train.distributed import rank0_speaks
    from harness.train.loop import train

    if args.threads:
        torch.set_num_threads(args.threads)
    with rank0_speaks():  # under torchrun: one line from rank 0, not one per rank
        saved = read_state(Path(args.out)) if args.resume else None
        run, cfg = run_from_args(args, saved)
    train(run, cfg, resume=args.resume)
    return 0


def run_from_args(args: argparse.Namespace, saved: dict | None) -> tuple[TrainRun, TrainConfig]:
    """The run and config the flags describe; with `saved` (a train_state.pt), the checkpoint's, the
    flags overriding its hyperparameters only."""
    train_kv, model_kv = split_overrides(args.overrides)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f"train_{f.name}")
        if value is not None:
            train_kv[f.name] = value
    base = TrainConfig(**_tuples(saved["config"])) if saved else TrainConfig()
    cfg = make_train_config(base, train_kv)
    if not saved:  # a resumed run keeps its own (already sized) values
        cfg = sized_to_steps(cfg, given=set(train_kv))
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
        results_dir=args.results_dir or DEFAULT_RESULTS_DIR,
        tensorboard=args.tensorboard,
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
    results_dir, tensorboard = args.results_dir or run.results_dir, args.tensorboard or run.tensorboard
    return dataclasses.replace(run, out=args.out, results_dir=results_dir, tensorboard=tensorboard)
