"""`harness lm-eval`: lm-eval tasks on any harness model, one result row per lm-eval metric.

    harness lm-eval --model gpt2-scratch --weights harness/assets/gpt2-default \\
        --tasks harness_sst2,harness_wikitext --limit 50

The model is built as `harness run` builds it and wrapped in the bridge's `HarnessLM`
(harness/lm_eval_bridge.py); `lm_eval.simple_evaluate` runs the tasks. The offline tasks shipped in
tasks/lm_eval/ are always found; `--include-path DIR` adds your own YAML tasks, and lm-eval's built-in
tasks are indexed only when a name is found nowhere else (they read from the Hugging Face hub or its
cache). Rows: task `lm-eval`, subtask = the lm-eval task name, metric = lm-eval's metric name without
its filter suffix (`acc,none` -> `acc`), stderr = lm-eval's (none where it reports N/A).
Everything is checked (tasks, include dirs, numbers, model name, device) before weights load.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.api import (
    HarnessError,
    Metric,
    ModelAdapter,
    ResultRow,
    ResultStore,
    check_device,
    load_weights,
    make_row,
)
from harness.api.store import DEFAULT_RESULTS_DIR

SHIPPED_TASKS = Path(__file__).resolve().parent.parent / "tasks" / "lm_eval"  # YAML + data, no import
TASK = "lm-eval"

EPILOG = """examples (offline: the tasks shipped in tasks/lm_eval, data from tasks/data):
  harness lm-eval --model gpt2-scratch --weights harness/assets/gpt2-default --tasks harness_sst2 --limit 50
  harness lm-eval --model gpt2-scratch,gpt2-hf --weights random:tiny --tasks harness_offline --limit 4
  harness lm-eval --model gpt2-hf --tasks my_task --include-path ~/my_lm_eval_tasks

shipped tasks: harness_sst2 (multiple_choice), harness_wikitext (loglikelihood_rolling),
  harness_sst2_gen (generate_until); the tag harness_offline runs all three. See docs/lm-eval.md.
"""


@dataclass
class LmEvalPlan:
    models: list[str]
    tasks: list[str]
    weights: str | None = None
    reference: str | None = None
    include_path: list[str] = field(default_factory=list)
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 1
    seed: int = 0
    device: str = "cpu"
    results_dir: str = DEFAULT_RESULTS_DIR


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_parser(sub) -> None:
    p = sub.add_parser("lm-eval", help="run lm-eval tasks on a harness model and append result rows",
                       description="Run lm-eval tasks (lm_eval.simple_evaluate) on harness models through the bridge; "
                       "one result row per lm-eval metric (task lm-eval, subtask = the lm-eval task).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--models", dest="models", type=_csv, required=True,
                   help="comma-separated model names (`harness list models`), or PATH.py:NAME with --reference")
    p.add_argument("--reference", default=None, metavar="REF",
                   help="the registered reference a PATH.py:NAME model is held to (docs/bring-your-own.md)")
    p.add_argument("--weights", default=None,
                   help="random[:SIZE] | alias | HF-format dir | hub id; default: each architecture's default")
    p.add_argument("--tasks", "--task", dest="tasks", type=_csv, required=True,
                   help="comma-separated lm-eval task, group or tag names (or YAML files)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="also index the lm-eval YAML tasks under DIR, repeatable (tasks/lm_eval is always indexed)")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="few-shot examples per prompt (default: each task's own, usually 0)")
    p.add_argument("--batch-size", type=int, default=1, help="requests per forward pass (default 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="init of random weights and lm-eval's four seeds (python, numpy, torch, few-shot); default 0")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                   help=f"where result rows are appended (default {DEFAULT_RESULTS_DIR}/, which git ignores)")
    p.set_defaults(func=cmd_lm_eval)


def cmd_lm_eval(args: argparse.Namespace) -> int:
    plan = LmEvalPlan(models=args.models, tasks=args.tasks, weights=args.weights, reference=args.reference,
                      include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                      batch_size=args.batch_size, seed=args.seed, device=args.device, results_dir=args.results_dir)
    console = Console(width=None if Console().is_terminal else 200)
    store = run(plan, Console(stderr=True))
    console.print(results_table(store.rows))
    console.print(f"{len(store.rows)} rows -> {store.path}")
    return 0


def validate(plan: LmEvalPlan) -> None:
    """Every option that needs no lm-eval and no weights."""
    if not plan.models:
        raise HarnessError("--model: give at least one model name (see `harness list models`)")
    if not plan.tasks:
        raise HarnessError("--tasks: give at least one lm-eval task name (e.g. harness_sst2; see docs/lm-eval.md)")
    for key, value, low in (("--limit", plan.limit, 1), ("--num-fewshot", plan.num_fewshot, 0),
                            ("--batch-size", plan.batch_size, 1), ("--seed", plan.seed, 0)):
        if value is not None and value < low:
            raise HarnessError(f"{key} {value}: must be at least {low}")
    for folder in plan.include_path:
        path = Path(folder).expanduser()
        if not path.is_dir():
            what = "a file, not a directory" if path.exists() else "no such directory"
            raise HarnessError(f"--include-path {folder}: {what}; give a directory of lm-eval YAML task files")
    check_device(plan.device)


def task_manager(plan: LmEvalPlan):
    """lm-eval's TaskManager over tasks/lm_eval and --include-path. lm-eval's built-in tasks (an index
    of some 15,000 YAML files, tens of seconds) are added only for a name found nowhere else, and only
    when some built-in YAML file mentions it at all (a plain text search, about a second)."""
    from lm_eval.tasks import TaskManager

    paths = [str(SHIPPED_TASKS), *(str(Path(p).expanduser()) for p in plan.include_path)]
    manager = TaskManager(include_path=paths, include_defaults=False)
    missing = _unknown(manager, plan.tasks)
    if not missing:
        return manager
    local = manager.all_tasks
    unheard = [name for name in missing if not _mentioned_in_builtin_tasks(name)]
    if not unheard:
        manager = TaskManager(include_path=paths, include_defaults=True)
        unheard = _unknown(manager, plan.tasks)
    if unheard:
        raise HarnessError(f"--tasks: unknown lm-eval task '{unheard[0]}'; local tasks: {', '.join(local)} "
                           "(lm-eval's own: `lm-eval ls tasks`; your own YAML: --include-path DIR)")
    return manager


def _mentioned_in_builtin_tasks(name: str) -> bool:
    """Whether any YAML file of lm-eval's built-in tasks contains `name` (necessary for it to be one)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return any(name in path.read_text(encoding="utf-8", errors="replace") for path in root.rglob("*.yaml"))


def _unknown(manager, names: list[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [n for n in names if n not in known and not (n.endswith((".yaml", ".yml")) and Path(n).is_file())]


def run(plan: LmEvalPlan, console: Console) -> ResultStore:
    """Validate everything, load every model's weights, then per model: evaluate, write its rows."""
    validate(plan)
    import torch

    from harness import lm_eval_bridge as bridge  # lm-eval is heavy: imported only for this command

    specs = {name: bridge.model_spec(name, plan.reference) for name in plan.models}  # unknown names first
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # lm-eval's per-task notices; its errors still show
    manager = task_manager(plan)
    weights = {}
    for spec in specs.values():  # bad --weights: one line, before any evaluation
        if spec.arch.name not in weights:
            weights[spec.arch.name] = load_weights(spec.arch, plan.weights, plan.seed)
    store: ResultStore | None = None
    for spec in specs.values():
        torch.manual_seed(plan.seed)
        model = spec.build(weights[spec.arch.name], plan.device)
        start = time.perf_counter()
        with _progress(console) as progress:
            lm = bridge.HarnessLM(model=model, batch_size=plan.batch_size, seed=plan.seed, track=_tracker(progress))
            results = evaluate(lm, plan, manager)
        store = store or ResultStore(plan.results_dir)
        for row in rows_of(results, model, plan, store.run_id, time.perf_counter() - start):
            store.append(row)
    assert store is not None  # at least one model (validate)
    return store


def evaluate(lm, plan: LmEvalPlan, manager) -> dict[str, Any]:
    import lm_eval

    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(plan.tasks), num_fewshot=plan.num_fewshot, limit=plan.limit,
            task_manager=manager, random_seed=plan.seed, numpy_random_seed=plan.seed,
            torch_random_seed=plan.seed, fewshot_random_seed=plan.seed,
        )
    except (KeyError, ValueError, FileNotFoundError) as e:
        from harness.api.errors import first_line

        raise HarnessError(f"lm-eval refused the run: {first_line(e)}") from e
    if out is None:  # only on a non-zero rank
        raise HarnessError("lm-eval returned no results (not rank 0)")
    return out


def rows_of(results: dict[str, Any], model: ModelAdapter, plan: LmEvalPlan, run_id: str,
            wall: float) -> list[ResultRow]:
    """One row per (lm-eval task, metric, filter). A metric a task reports under several filters
    (gsm8k's strict-match / flexible-extract) gets subtask `TASK,FILTER` per filter."""
    import lm_eval

    out = []
    for task, values in results["results"].items():
        entries = [(key.partition(",")[0], key.partition(",")[2], value) for key, value in values.items()
                   if "," in key and "_stderr," not in key and _number(value) is not None]
        counts = {m: sum(1 for m2, _, _ in entries if m2 == m) for m, _, _ in entries}
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for metric, filt, value in entries:
            stderr = _number(values.get(f"{metric}_stderr,{filt}"))
            m = Metric(metric=metric, value=float(value), n=n, stderr=stderr,
                       higher_is_better=results.get("higher_is_better", {}).get(task, {}).get(metric),
                       subtask=task if counts[metric] == 1 else f"{task},{filt}",
                       extra={"filter": filt, "lm_eval_key": f"{metric},{filt}"})
            config = {"lm_eval_version": lm_eval.__version__,
                      "lm_eval_task": task, "num_fewshot": results.get("n-shot", {}).get(task),
                      "limit": plan.limit, "batch_size": plan.batch_size,
                      "include_path": list(plan.include_path), "filter": filt}
            out.append(make_row(m, model=model.name, weights=model.weights, task=TASK,
                                task_version=str(results.get("versions", {}).get(task, "")), config=config,
                                seed=plan.seed, run_id=run_id, device=str(model.device), wall_seconds=wall))
    return out


def _number(value: Any) -> float | None:
    """lm-eval's numbers (Python or numpy floats); None for its 'N/A' and for NaN/inf stderrs."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def results_table(rows: list[ResultRow]) -> Table:
    table = Table(title="lm-eval results")
    for col in ("model", "subtask", "metric", "value", "± stderr", "n", "weights"):
        table.add_column(col, justify="right" if col in ("value", "± stderr", "n") else "left")
    for r in rows:
        table.add_row(r.model, r.subtask, r.metric, _fmt(r.value), "" if r.stderr is None else _fmt(r.stderr),
                      "" if r.n is None else str(r.n), r.weights)
    return table


def _fmt(value: float) -> str:
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.3e}"


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _tracker(progress: Progress):
    def track(items, total: int | None = None, description: str = "working"):
        return progress.track(items, total=total, description=description)

    return track
