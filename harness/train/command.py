"""The `harness train` command line: its flags (one per `TrainConfig` field, plus `--set`), the run
they describe (a new one, or the one checkpointed in `--out` with `--resume`), and `cmd_train`.
The training itself is `harness.train.loop.train`; the package docstring states its choices.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from harness.api import HarnessError
from harness.train.checkpoint import read_state
from harness.train.config import TrainConfig, TrainRun, make_train_config, show, split_overrides
from harness.train.loop import train


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
            help=f"{f.metadata['help']} (default {show(f.default)})",
        )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
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
