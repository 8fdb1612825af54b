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
    Task,
    Weights,
    check_device,
    load_weights,
    make_config,
    make_row,
)


@dataclass
class RunPlan:
    models: list[str]
    tasks: list[str]
    weights: str | None = None  # None: each architecture's default weights
    limit: int | None = None
    seed: int = 0
    device: str = "cpu"
    results_dir: str = "results"
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> key -> raw value


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
            self._models[name] = spec.build(self.weights(spec), self.plan.device)
        return self._models[name]

    def reference(self, model: ModelAdapter) -> ModelAdapter | None:
        return self.get(model.info.reference) if model.info.reference else None

    def release(self, keep: set[str]) -> None:
        for name in [n for n in self._models if n not in keep]:
            del self._models[name]


def validate(plan: RunPlan) -> dict[str, Task]:
    """Check every name before any work starts; return the configured tasks."""
    if not plan.models:
        raise HarnessError("--model: give at least one model name (see `harness list models`)")
    if not plan.tasks:
        raise HarnessError("--tasks: give at least one task name (see `harness list tasks`)")
    for name in plan.models:
        MODELS.entry(name)
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
    tasks = {name: TASKS.get(name)(make_config(TASKS.get(name), plan.overrides.get(name, {}))) for name in plan.tasks}
    for task in tasks.values():
        task.validate()  # config checks that need no model (files, ranges), before any weights load
    return tasks


def run(plan: RunPlan, console: Console | None = None) -> tuple[ResultStore, list[Failure]]:
    console = console or Console(stderr=True)
    tasks = validate(plan)
    store = ResultStore(plan.results_dir)
    pool = ModelPool(plan)
    for name in plan.models:  # bad --weights fail here, before any work, as a one-line error
        pool.weights(MODELS.get(name))
    failures: list[Failure] = []
    with _progress(console) as progress:
        overall = progress.add_task("models x tasks", total=len(plan.models) * len(tasks))
        for model_name in plan.models:
            for task in tasks.values():
                failure = _run_one(pool, model_name, task, plan, store, progress)
                if failure:
                    failures.append(failure)
                    console.print(f"[red]x[/red] {failure.model} / {failure.task}: {failure.message}")
                progress.advance(overall)
            pool.release(keep=set())
    return store, failures


def _run_one(pool: ModelPool, model_name: str, task: Task, plan: RunPlan, store: ResultStore, progress: Progress):
    """Run one task on one model, appending each row the moment its metric is computed."""
    start = time.perf_counter()
    try:
        model = pool.get(model_name)
        task.check(model)
        ctx = RunContext(plan.seed, plan.limit, plan.device, pool.reference, _tracker(progress), plan.results_dir)
        torch.manual_seed(plan.seed)
        for metric in task.run(model, ctx):
            store.append(row_of(model, task, metric, plan, store.run_id, time.perf_counter() - start))
    except HarnessError as e:
        return Failure(model_name, task.name, str(e))
    return None


def row_of(model: ModelAdapter, task: Task, m: Metric, plan: RunPlan, run_id: str, wall: float) -> ResultRow:
    return make_row(m, model=model.name, weights=model.weights, task=task.name, task_version=task.version,
                    config=_config_dict(task, plan), seed=plan.seed, run_id=run_id, device=str(model.device),
                    wall_seconds=wall)


def _config_dict(task: Task, plan: RunPlan) -> dict[str, Any]:
    return {**asdict(task.config), "limit": plan.limit}


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
