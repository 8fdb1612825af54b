"""`harness run`: every model on every task, one result row per metric, written as it is computed.

The chain: resolve names -> build task configs -> for each model: load weights (shared with its
reference) -> build adapter -> for each task: run -> write rows. A failing task is reported and the
run goes on; rows already written are never lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harness.api import (
    MODELS,
    TASKS,
    HarnessError,
    Metric,
    ModelAdapter,
    ModelSpec,
    ResultRow,
    ResultStore,
    RunContext,
    RunJournal,
    Task,
    Weights,
    check_device,
    load_weights,
    make_config,
    make_row,
)
from harness.api.store import DEFAULT_RESULTS_DIR, check_same_plan, newest_run


@dataclass
class RunPlan:
    models: list[str]
    tasks: list[str]
    weights: str | None = None  # None: each architecture's default weights
    limit: int | None = None
    seed: int = 0
    device: str = "cpu"
    results_dir: str = DEFAULT_RESULTS_DIR
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> key -> raw value
    reference: str | None = None  # --reference: the registered reference a user's model (PATH.py:NAME) is held to
    resume: bool = False  # continue the newest run in results_dir (same plan): finished units are not redone
    compile: bool = False  # --compile: torch.compile every model that has a reference (nn.Module.compile)


@dataclass
class Failure:
    model: str
    task: str
    message: str


class ModelPool:
    """Builds adapters on demand; weights are loaded once per (architecture, --weights)."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self._weights: dict[tuple[str, str | None], Weights] = {}
        self._models: dict[str, ModelAdapter] = {}

    def weights(self, spec: ModelSpec) -> Weights:
        key = (spec.arch.name, self.plan.weights)
        if key not in self._weights:
            self._weights[key] = load_weights(spec.arch, self.plan.weights, self.plan.seed)
        return self._weights[key]

    def get(self, name: str) -> ModelAdapter:
        if name not in self._models:
            spec: ModelSpec = MODELS.get(name)
            torch.manual_seed(self.plan.seed)  # heads absent from a checkpoint get a seeded init
            model = spec.build(self.weights(spec), self.plan.device)
            if self.plan.compile and model.info.reference and isinstance(model.module, torch.nn.Module):
                model.compile()  # in place (same parameters and state_dict names); references stay eager
            self._models[name] = model
        return self._models[name]

    def reference(self, model: ModelAdapter) -> ModelAdapter | None:
        return self.get(model.info.reference) if model.info.reference else None

    def release(self, keep: set[str]) -> None:
        for name in [n for n in self._models if n not in keep]:
            del self._models[name]


def resolve_model(name: str, reference: str | None) -> ModelSpec:
    """`--model name` with `--reference`: a user's model (`PATH.py:NAME`) is resolved against it and
    afterwards found by name (`MODELS.get`); a registered model must not contradict it; a reference
    model listed beside a user's (`--model mine.py:build,gpt2-hf`) ignores it."""
    if name in MODELS and MODELS.get(name).info.reference is None:
        return MODELS.get(name)
    return MODELS.resolve(name, reference)


def validate(plan: RunPlan) -> dict[str, Task]:
    """Check every name before any work starts; return the configured tasks."""
    if not plan.models:
        raise HarnessError("--model: give at least one model name (see `harness list models`)")
    if not plan.tasks:
        raise HarnessError("--tasks: give at least one task name (see `harness list tasks`)")
    for name in plan.models:
        resolve_model(name, plan.reference)
        if plan.models.count(name) > 1:
            raise HarnessError(f"--model: '{name}' is given {plan.models.count(name)} times; name each model once")
    for name in plan.tasks:
        TASKS.entry(name)
    for name, keys in plan.overrides.items():
        TASKS.entry(name)
        if name not in plan.tasks:
            raise HarnessError(f"--set {name}.{next(iter(keys), 'KEY')}: task '{name}' is not in --tasks "
                               f"{','.join(plan.tasks)}; add it there or drop the override")
    if plan.limit is not None and plan.limit < 1:
        raise HarnessError(f"--limit {plan.limit}: must be at least 1 (leave it out to use every document)")
    if plan.seed < 0:
        raise HarnessError(f"--seed {plan.seed}: must be >= 0")
    check_device(plan.device)
    if plan.compile:
        check_compiler(plan.device)
    tasks = {name: TASKS.get(name)(make_config(TASKS.get(name), plan.overrides.get(name, {}))) for name in plan.tasks}
    for task in tasks.values():
        task.validate()  # config checks that need no model (files, ranges), before any weights load
    for name, keys in plan.overrides.items():
        for key, raw in keys.items():
            check_range(name, key, raw, getattr(tasks[name].config, key))
    return tasks


# `--set` values whose meaning fixes a range, by the key's last word (every task names its fields so):
# counts and sizes are at least 1, learning rates positive, thread and resample counts not negative.
AT_LEAST_ONE = {"size", "sizes", "steps", "epochs", "samples", "examples", "len", "lens", "tokens", "repeats",
                "vocab", "length", "batch", "prompts", "candidates", "layers", "heads", "points", "chars",
                "frequency", "allowed"}
NOT_NEGATIVE = {"threads", "bootstrap", "warmup", "decay", "smoothing", "ratio", "clip", "beta", "coef", "gamma",
                "lam", "epsilon", "atol", "temperature", "jitter"}
FRACTION = {"fraction"}  # strictly between 0 and 1


def check_range(task: str, key: str, raw: str, value: Any) -> None:
    """Refuse an overridden value outside the range its key implies (or a NaN / inf), in one line."""
    last = "warmup" if key.startswith("warmup") else key.rsplit("_", 1)[-1]  # warmup_steps=0: no warmup, >= 0
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v != v or v in (float("inf"), float("-inf")):
            problem = "must be a finite number"
        elif last in AT_LEAST_ONE and v < 1:
            problem = "must be at least 1"
        elif (last == "lr" or key.startswith("lr_")) and v <= 0:
            problem = "must be > 0 (a learning rate)"
        elif last in NOT_NEGATIVE and v < 0:
            problem = "must be >= 0"
        elif last in FRACTION and not 0 < v < 1:
            problem = "must be between 0 and 1"
        else:
            continue
        raise HarnessError(f"--set {task}.{key}={raw}: {problem}")


def run(plan: RunPlan, console: Console | None = None) -> tuple[ResultStore, list[Failure]]:
    console = console or Console(stderr=True)
    tasks = validate(plan)
    plan = _rank_zero_writes(plan)
    record = plan_record(plan, tasks)
    run_id = newest_run(plan.results_dir) if plan.resume else None
    if run_id:
        check_same_plan(plan.results_dir, run_id, record)  # another plan is refused before any weights load
    store = ResultStore(plan.results_dir, run_id)
    pool = ModelPool(plan)
    for name in plan.models:  # bad --weights fail here, before any work, as a one-line error
        pool.weights(MODELS.get(name))
    for name in (n for n in plan.models if MODELS.get(n).info.impl == "user"):
        pool.get(name)  # a user's NAME(hf_config), weight placement and forward are checked before any work
    journal = _journal(store, record, pool, tasks, resume=run_id is not None)
    if run_id:
        todo = sum(not journal.is_complete(m, t) for m in plan.models for t in tasks)
        console.print(f"resuming run {run_id}: {len(store.rows)} rows kept, {journal.dropped} of a unit cut short "
                      f"dropped; {todo} of {len(plan.models) * len(tasks)} (model, task) units to run", highlight=False)
    failures: list[Failure] = []
    with _progress(console) as progress:
        overall = progress.add_task("models x tasks", total=len(plan.models) * len(tasks))
        for model_name in plan.models:
            for task in tasks.values():
                done = journal.is_complete(model_name, task.name)  # by an earlier attempt (--resume)
                failure = None if done else _run_one(pool, model_name, task, plan, store, progress, journal)
                if failure:
                    failures.append(failure)
                    console.print(f"[red]x[/red] {failure.model} / {failure.task}: {failure.message}")
                progress.advance(overall)
            pool.release(keep=set())
    return store, failures


def _run_one(pool: ModelPool, model_name: str, task: Task, plan: RunPlan, store: ResultStore, progress: Progress,
             journal: RunJournal | None = None):
    """Run one task on one model, appending each row the moment its metric is computed."""
    start = time.perf_counter()
    try:
        model = pool.get(model_name)
        task.check(model)
        ctx = RunContext(plan.seed, plan.limit, plan.device, pool.reference, _tracker(progress), plan.results_dir,
                         **_resume_hooks(journal, model_name, task.name))
        torch.manual_seed(plan.seed)
        for metric in task.run(model, ctx):
            store.append(row_of(model, task, metric, plan, store.run_id, time.perf_counter() - start))
        if journal is not None:
            journal.finish(model_name, task.name)
    except HarnessError as e:
        return Failure(model_name, task.name, str(e))
    return None


def plan_record(plan: RunPlan, tasks: dict[str, Task]) -> dict[str, Any]:
    """What a run computes, stored beside its rows: `--resume` continues only a run of the same plan."""
    return {"models": plan.models, "reference": plan.reference, "tasks": list(tasks), "weights": plan.weights,
            "limit": plan.limit, "seed": plan.seed, "device": plan.device,
            "task_versions": {n: t.version for n, t in tasks.items()},
            "configs": {n: asdict(t.config) for n, t in tasks.items()}, **_compiled(plan)}


def _journal(store: ResultStore, record: dict[str, Any], pool: ModelPool, tasks: dict[str, Task],
             resume: bool) -> RunJournal:
    """A new run's journal, or (--resume) the earlier run's, its rows of units cut short dropped."""
    record["weights_sha256"] = {n: pool.weights(MODELS.get(n)).sha256 for n in record["models"]}
    if not resume:
        return RunJournal.start(store, record)
    journal = RunJournal.reopen(store, record)
    journal.forget(_redo_with_reference(journal, record["models"], tasks))
    journal.prune()
    return journal


def _redo_with_reference(journal: RunJournal, models: list[str], tasks: dict[str, Task]) -> set[tuple[str, str]]:
    """Finished units of a task that measures a model's reference inside the model's unit, whose
    reference's unit is not finished: the reference's rows were never written, so both are redone."""
    redo = set()
    for task in (t for t in tasks.values() if t.measures_reference):
        for name in models:
            ref = MODELS.get(name).info.reference
            if ref in models and journal.is_complete(name, task.name) and not journal.is_complete(ref, task.name):
                redo.add((name, task.name))
    return redo


def _resume_hooks(journal: RunJournal | None, model: str, task: str) -> dict[str, Any]:
    if journal is None:
        return {}
    return {"completed": lambda sub: journal.subtask_done(model, task, sub),
            "on_done": lambda sub: journal.finish(model, task, sub)}


def row_of(model: ModelAdapter, task: Task, m: Metric, plan: RunPlan, run_id: str, wall: float) -> ResultRow:
    return make_row(m, model=model.name, weights=model.weights, task=task.name, task_version=task.version,
                    config=_config_dict(task, plan), seed=plan.seed, run_id=run_id, device=str(model.device),
                    wall_seconds=wall, model_sha256=getattr(model, "model_sha256", None))  # a user's file


def _config_dict(task: Task, plan: RunPlan) -> dict[str, Any]:
    """A row's config: the task's, the limit, and `compile: true` under --compile (so the gate and the
    report never compare a compiled run's rows with an eager baseline's as if they were the same plan)."""
    return {**asdict(task.config), "limit": plan.limit, **_compiled(plan)}


def _compiled(plan: RunPlan) -> dict[str, bool]:
    """`compile: true` under --compile, nothing otherwise (records of eager runs stay as they were)."""
    return {"compile": True} if plan.compile else {}


def check_compiler(device: str) -> None:
    """torch.compile's CPU backend (inductor) builds C++ kernels: refuse --compile up front without a compiler."""
    import shutil

    if device == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise HarnessError("--compile on CPU needs a C++ compiler (torch.compile's inductor builds C++ kernels): "
                           "install g++ (e.g. apt install g++) or drop --compile")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _tracker(progress: Progress):
    def track(iterable: Iterable, total: int | None = None, description: str = "working"):
        return progress.track(iterable, total=total, description=description)

    return track


def _rank_zero_writes(plan: RunPlan) -> RunPlan:
    """Under torchrun (RANK set) rank 0 alone writes rows: tasks that shard their work (ppl) all-reduce
    it, so every rank computes the same rows, and the other ranks' go to a throwaway directory."""
    import atexit
    import os
    import shutil
    import tempfile
    from dataclasses import replace

    if os.environ.get("RANK", "0") == "0":
        return plan
    scratch = tempfile.mkdtemp(prefix=f"harness-rank{os.environ['RANK']}-")
    atexit.register(shutil.rmtree, scratch, True)
    return replace(plan, results_dir=scratch, resume=False)
