"""The `harness` command line: run, list, report, gate (and train / generate where available)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rich.console import Console
from rich.table import Table

from harness.api import HarnessError

# Off a terminal (pipes, CI logs) rich would wrap tables at 80 columns; give them room instead.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

EPILOG = """examples:
  harness list models
  harness run --model gpt2-scratch,gpt2-hf --tasks ppl,parity
  harness run --model gpt2-scratch --tasks ppl --set ppl.stride=512 --limit 5
  harness report --out reports/report.md
  harness run --model gpt2-scratch,gpt2-hf --tasks ppl,parity --limit 4 --results-dir smoke
  harness gate --baseline results/baseline --results-dir smoke   # the CI smoke above vs the baseline: exit 0
"""


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness", description=__doc__.splitlines()[0] if __doc__ else None, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_list(sub)
    _add_report(sub)
    _add_gate(sub)
    for module in _EXTRA_COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="evaluate models on tasks and append result rows",
                       description="Run every model on every task; each metric becomes a result row.")
    p.add_argument("--model", "--models", dest="models", type=_csv, required=True,
                   help="comma-separated model names (see `harness list models`)")
    p.add_argument("--tasks", "--task", dest="tasks", type=_csv, required=True,
                   help="comma-separated task names (see `harness list tasks`)")
    p.add_argument("--weights", default=None,
                   help="random[:SIZE] | alias | HF-format dir | hub id; default: each architecture's default")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents/examples per task")
    p.add_argument("--seed", type=int, default=0, help="fixes data order, init and sampling (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--results-dir", default="results", help="where result rows are appended (default results/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TASK.KEY=VALUE",
                   help="override a task config field, repeatable (e.g. --set ppl.stride=512)")
    p.set_defaults(func=cmd_run)


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list registered models or tasks")
    p.add_argument("what", choices=["models", "tasks"])
    p.set_defaults(func=cmd_list)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write a markdown report (with plots) from result rows")
    p.add_argument("--results-dir", action="append", default=None,
                   help="results dir or .jsonl file, repeatable (default results/)")
    p.add_argument("--out", default="reports/report.md", help="markdown file to write (default reports/report.md)")
    p.set_defaults(func=cmd_report)


GATE_EPILOG = """exit codes: 0 passed; 1 a regression (REGRESSED / OVER THRESHOLD); 2 usage error;
  3 nothing compared, or with --require-all a baseline metric MISSING or with a config that differs.
  Rows are compared only when their plan matches (task version, task config incl. limit, seed, weights
  hash); a row of another plan is listed as `config differs`, never as a pass or a regression.

example (a fresh checkout: CI's GPT-2 smoke run of .ci/run, then the gate; exit 0, GLUE rows MISSING):
  harness run --model gpt2-scratch,gpt2-hf --tasks ppl,parity --limit 4 --results-dir smoke
  harness gate --baseline results/baseline --results-dir smoke --junit gate.xml --json gate.json

The default --results-dir (results/) holds full runs, not the --limit 4 plan of results/baseline: gating it
lists them as `config differs` and exits 3. CI (docs/ci.md) runs both smoke commands and adds
--require-all --skip train_seconds.
"""


def _add_gate(sub) -> None:
    p = sub.add_parser("gate", help="fail (exit 1) when a metric regressed against a committed baseline",
                       description="Compare the newest plan-matching result rows with a committed baseline.",
                       epilog=GATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="baseline results dir or .jsonl file")
    p.add_argument("--results-dir", default="results", help="results to check (default results/)")
    p.add_argument("--tol", action="append", default=[], metavar="METRIC=abs:X|rel:Y",
                   help="override a metric's tolerance, repeatable (e.g. --tol word_perplexity=rel:0.01)")
    p.add_argument("--require-all", action="store_true",
                   help="also fail (exit 3) when a baseline metric is missing or its config differs")
    p.add_argument("--skip", action="append", default=[], metavar="METRIC",
                   help="list but do not gate this metric, repeatable (e.g. --skip train_seconds: wall-clock "
                        "time on a shared CI machine is noise, not a regression)")
    p.add_argument("--junit", default=None, metavar="PATH",
                   help="also write the verdicts as JUnit XML (one testcase per metric)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                   help="also write the verdicts and a summary as JSON")
    p.set_defaults(func=cmd_gate)


# Modules that add their own subcommand with `add_parser(subparsers)`, to keep this file short.
_EXTRA_COMMANDS: list[str] = ["harness.train.command", "harness.generate"]


def cmd_run(args: argparse.Namespace) -> int:
    from harness.api import TASKS, parse_overrides
    from harness.runner import RunPlan, run

    plan = RunPlan(
        models=args.models, tasks=args.tasks, weights=args.weights, limit=args.limit, seed=args.seed,
        device=args.device, results_dir=args.results_dir, overrides=parse_overrides(args.overrides, TASKS.names()),
    )
    store, failures = run(plan, err_console)  # validates every name and option before any work
    if store.rows:
        console.print(results_table(store.rows))
        console.print(f"{len(store.rows)} rows -> {store.path}")
    else:  # every (model, task) failed: no table of nothing, and no path of a file never written
        err_console.print("no rows written: every model/task above failed", highlight=False)
    return 1 if failures else 0


def results_table(rows) -> Table:
    table = Table(title="results", show_lines=False)
    for col in ("model", "task", "subtask", "metric", "value", "± stderr", "n", "weights"):
        table.add_column(col, justify="right" if col in ("value", "± stderr", "n") else "left")
    for r in rows:
        table.add_row(r.model, r.task, r.subtask, r.metric, fmt(r.value),
                      "" if r.stderr is None else fmt(r.stderr), "" if r.n is None else str(r.n), r.weights)
    return table


def fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.4f}"
    return f"{value:.3e}"


def cmd_list(args: argparse.Namespace) -> int:
    from harness.api import MODELS, TASKS

    registry = MODELS if args.what == "models" else TASKS
    table = Table(title=f"{args.what}")
    table.add_column("name", style="bold")
    table.add_column("description")
    for entry in registry:
        table.add_row(entry.name, entry.description)
    console.print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report

    path = write_report(args.results_dir or ["results"], args.out)
    console.print(f"report -> {path}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from harness.gate import check_output_path, gate, parse_tolerances, step_summary_path, summary_line, write_outputs

    check_output_path(args.junit, "--junit")
    check_output_path(args.json_path, "--json")
    verdict = gate(args.baseline, args.results_dir, parse_tolerances(args.tol), args.require_all,
                   skip=set(args.skip))
    console.print(verdict.table)
    for path in write_outputs(verdict, args.junit, args.json_path, step_summary_path()):
        console.print(f"gate report -> {path}")
    colour = "green" if verdict.exit_code == 0 else "red"
    console.print(f"[{colour}]{summary_line(verdict)}[/{colour}]", highlight=False)
    return verdict.exit_code


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HarnessError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted; rows already written are kept")
        return 130


if __name__ == "__main__":
    sys.exit(main())
