"""The `harness` command line: run, list, report, gate (and train / generate where available)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rich.console import Console
from rich.table import Table

from harness.api import HarnessError
from harness.api.memory import keep_freed_memory
from harness.api.store import DEFAULT_REPORT, DEFAULT_RESULTS_DIR, check_output_file

# Off a terminal (pipes, CI logs) rich would wrap tables at 80 columns; give them room instead.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

EPILOG = """examples:
  harness list models
  harness run --model gpt2-scratch,gpt2-hf --tasks ppl,parity
  harness run --model gpt2-scratch --tasks ppl --set ppl.stride=512 --limit 5
  harness report                                   # your runs (runs/results/) -> runs/report/report.md
  harness report --results-dir results --out reports/report.md   # regenerate the committed report
  harness run --model gpt2-scratch,gpt2-hf --tasks ppl,parity --limit 4 --results-dir smoke
  harness gate --baseline results/baseline --results-dir smoke   # the CI smoke above vs the baseline: exit 0
"""


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Every subcommand's parser. Given the command line, only the named command's module is imported (some
    import torch at the top): `harness list` stays under 2 s, `harness train` skips diagnose's imports;
    `harness --help` or a mistyped command gets them all."""
    parser = argparse.ArgumentParser(
        prog="harness", description=__doc__.splitlines()[0] if __doc__ else None, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_list(sub)
    _add_report(sub)
    _add_gate(sub)
    command = argv[0] if argv else None
    if command not in ("run", "list", "report", "gate"):  # the built-ins need no extra module
        named = [_EXTRA_COMMANDS[command]] if command in _EXTRA_COMMANDS else _EXTRA_COMMANDS.values()
        for module in named:  # `harness train ...` imports only the train command; --help imports them all
            importlib.import_module(module).add_parser(sub)
    return parser


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="evaluate models on tasks and append result rows",
                       description="Run every model on every task; each metric becomes a result row.")
    p.add_argument("--model", "--models", dest="models", type=_csv, required=True,
                   help="comma-separated model names (see `harness list models`), or your own model as "
                        "PATH.py:NAME or package.module:NAME with --reference (docs/bring-your-own.md)")
    p.add_argument("--reference", default=None, metavar="REF",
                   help="the registered reference (gpt2-hf, llama-hf, bert-hf, ...) a PATH.py:NAME model is held "
                        "to: it supplies the architecture, the default weights and the tokenizer")
    p.add_argument("--tasks", "--task", dest="tasks", type=_csv, required=True,
                   help="comma-separated task names (see `harness list tasks`)")
    p.add_argument("--weights", default=None,
                   help="random[:SIZE] | alias | HF-format dir | hub id; default: each architecture's default")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents/examples per task")
    p.add_argument("--seed", type=int, default=0, help="fixes data order, init and sampling (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                   help=f"where result rows are appended (default {DEFAULT_RESULTS_DIR}/, which git ignores; "
                        "name results/... to add to the committed runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TASK.KEY=VALUE",
                   help="override a task config field, repeatable (e.g. --set ppl.stride=512)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the models that have a reference (scratch and your own; references stay eager); "
                        "rows carry config compile=true; the scratch models' batch decode step is compiled too. The "
                        "first call of each new shape compiles (~40 s on 2 CPU cores, ~90 s for a 124M decode); on "
                        "CPU it pays off for batch-1 decode only (124M: 1.09x), not prefill (docs/throughput.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue the newest run in --results-dir after a kill or Ctrl-C: the same command plus "
                        "--resume redoes only the (model, task, subtask) units it had not finished; refused when "
                        "that run's plan differs")
    p.set_defaults(func=cmd_run)


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list registered models or tasks")
    p.add_argument("what", choices=["models", "tasks"])
    p.set_defaults(func=cmd_list)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write a markdown report (with plots) from result rows")
    p.add_argument("--results-dir", action="append", default=None,
                   help=f"results dir or .jsonl file, repeatable (default {DEFAULT_RESULTS_DIR}/, where "
                        "`harness run` writes; the committed runs are under results/)")
    p.add_argument("--out", default=DEFAULT_REPORT,
                   help=f"markdown file to write, plots beside it (default {DEFAULT_REPORT}, which git ignores; "
                        "the committed report changes only with an explicit --out reports/report.md)")
    p.add_argument("--run-id", dest="run_ids", action="append", type=_csv, default=[], metavar="ID[,ID...]",
                   help="only the rows of these runs (an id or a unique prefix, as in <results-dir>/v1/<ID>.jsonl), "
                        "repeatable or comma-separated")
    p.add_argument("--latest", action="store_true", help="only the rows of the newest run in --results-dir")
    p.set_defaults(func=cmd_report)


GATE_EPILOG = """exit codes: 0 passed; 1 a regression (REGRESSED / OVER THRESHOLD); 2 usage error;
  3 nothing compared, or with --require-all a baseline metric MISSING or with a config that differs.
  Rows are compared only when their plan matches (task version, task config incl. limit, seed, weights
  hash); a row of another plan is listed as `config differs`, never as a pass or a regression.

example (a fresh checkout: CI's GPT-2 smoke run of .ci/run, then the gate; exit 0, GLUE rows MISSING):
  harness run --model gpt2-scratch,gpt2-hf --tasks ppl,parity --limit 4 --results-dir smoke
  harness gate --baseline results/baseline --results-dir smoke --junit gate.xml --json gate.json

The default --results-dir (runs/results/, where `harness run` writes) holds your own runs: rows of another plan
than results/baseline's (e.g. full runs, not --limit 4) are listed as `config differs`, and the gate exits 3.
CI (docs/ci.md) runs both smoke commands and adds --require-all --skip train_seconds.
"""


def _add_gate(sub) -> None:
    p = sub.add_parser("gate", help="fail (exit 1) when a metric regressed against a committed baseline",
                       description="Compare the newest plan-matching result rows with a committed baseline.",
                       epilog=GATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="baseline results dir or .jsonl file")
    p.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                   help=f"results to check (default {DEFAULT_RESULTS_DIR}/, where `harness run` writes)")
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
_EXTRA_COMMANDS: dict[str, str] = {  # command -> module with its add_parser(sub); imported when named (or for --help)
    "train": "harness.train.command", "generate": "harness.generate", "diagnose": "harness.diagnose",
    "lm-eval": "harness.lm_eval_cmd",
}


def cmd_run(args: argparse.Namespace) -> int:
    from harness.api import TASKS, parse_overrides
    from harness.runner import RunPlan, run

    plan = RunPlan(
        models=args.models, tasks=args.tasks, weights=args.weights, limit=args.limit, seed=args.seed,
        device=args.device, results_dir=args.results_dir, overrides=parse_overrides(args.overrides, TASKS.names()),
        resume=args.resume, reference=args.reference, compile=args.compile,
    )
    store, failures = run(plan, err_console)  # validates every name and option before any work
    if store.rows:
        console.print(results_table(store.rows))
        console.print(f"{len(store.rows)} rows -> {store.path}")
    else:  # every (model, task) failed: no table of nothing, and no path of a file never written
        err_console.print("no rows written: every model/task above failed", highlight=False)
    return 1 if failures else 0


def results_table(rows) -> Table:
    """The rows of a run, numbers formatted by kind, and for each scratch row the verdict against its
    reference's row of the same run and plan (harness/report.py: the report's scorecard rule)."""
    from harness.api import metric_spec
    from harness.report import fmt_value, metric_kind, run_verdicts, verdict_cell

    checks = run_verdicts(rows)
    table = Table(title="results", show_lines=False)
    for col in ("model", "task", "subtask", "metric", "value", "± stderr", "n", "weights", "vs reference"):
        table.add_column(col, justify="right" if col in ("value", "± stderr", "n") else "left")
    for r in rows:
        kind = metric_kind(r.metric, metric_spec(r.task, r.metric, r.higher_is_better))
        check = checks.get((r.model, r.task, r.weights, r.subtask, r.metric))
        cell = verdict_cell(check)
        style = "" if check is None or check.ok is None else (
            "green" if check.ok else "yellow" if check.timing else "bold red")
        table.add_row(r.model, r.task, r.subtask, r.metric, fmt_value(r.value, kind, r.metric),
                      "" if r.stderr is None else f"{r.stderr:.2g}", "" if r.n is None else f"{r.n:,}", r.weights,
                      f"[{style}]{cell}[/{style}]" if style else cell)
    return table


def cmd_list(args: argparse.Namespace) -> int:
    """The registered models or tasks, read from the listing cache when current (harness/api/listing.py):
    no plugin, torch or transformers is imported for it."""
    from harness.api.listing import listing

    rows = listing(args.what)
    console.print(models_table(rows) if args.what == "models" else tasks_table(rows))
    return 0


def models_table(rows: list[dict]) -> Table:
    table = Table(title="models (run one with --model NAME; weights with --weights)", show_lines=True)
    for col in ("name", "default weights", "capabilities", "reference pair", "description"):
        table.add_column(col, style="bold" if col == "name" else None)
    for r in rows:
        weights = r["default_weights"] + (f"\n(aliases: {', '.join(r['aliases'])})" if r["aliases"] else "")
        pair = (f"held to {r['reference']}" if r["reference"] else f"reference of {r['scratch']}" if r["scratch"]
                else "-")
        table.add_row(r["name"], weights or "-", ", ".join(r["capabilities"]) or "-", pair, r["description"])
    return table


def tasks_table(rows: list[dict]) -> Table:
    table = Table(title="tasks (run one with --tasks NAME; change a config key with --set TASK.KEY=VALUE)",
                  show_lines=True)
    for col in ("name", "needs", "config keys (type = default)", "metrics (better; pair tolerance)", "description"):
        table.add_column(col, style="bold" if col == "name" else None)
    for r in rows:
        keys = "\n".join(f"{r['name']}.{k['key']}: {k['type']} = {k['default']}" for k in r["config"]) or "-"
        metrics = "\n".join(f"{m['name']}{' (headline)' if m['name'] == r['headline'] else ''}: {m['better']}; "
                            f"{m['pair_tolerance']}" for m in r["metrics"]) or "-"
        table.add_row(f"{r['name']}\nv{r['version']}", ", ".join(r["needs"]) or "-", keys, metrics,
                      r["description"])
    return table


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report

    check_output_file(args.out, "--out")
    run_ids = [r for group in args.run_ids for r in group]
    path = write_report(args.results_dir or [DEFAULT_RESULTS_DIR], args.out, run_ids=run_ids, latest_run=args.latest)
    console.print(f"report -> {path}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from harness.gate import check_output_path, gate, parse_tolerances, step_summary_path, summary_line, write_outputs

    check_output_path(args.junit, "--junit")
    check_output_file(args.junit, "--junit")
    check_output_file(args.json_path, "--json")
    check_output_path(args.json_path, "--json")
    verdict = gate(args.baseline, args.results_dir, parse_tolerances(args.tol), args.require_all,
                   skip=set(args.skip))
    console.print(verdict.table)
    for path in write_outputs(verdict, args.junit, args.json_path, step_summary_path()):
        console.print(f"gate report -> {path}")
    colour = "green" if verdict.exit_code == 0 else "red"
    console.print(f"[{colour}]{summary_line(verdict)}[/{colour}]", highlight=False)
    return verdict.exit_code


# Libraries' own progress bars (transformers' "Loading weights", hub downloads, datasets, lm-eval's
# tqdm) are off unless the environment turns them on; ours (rich) say what the harness is doing.
QUIET_LIBRARIES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def quiet_libraries() -> None:
    """Turn the libraries' bars off before they are imported (the environment variables above), or now
    where they already are (e.g. under pytest); without importing any of them. Off a terminal, every
    rich console made later gets 200 columns (COLUMNS) instead of wrapping CI logs at 80."""
    for var, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(var, value)
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["datasets"].disable_progress_bars()
    if not sys.stderr.isatty():
        os.environ.setdefault("COLUMNS", "200")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_freed_memory()  # large tensors reuse freed memory instead of faulting in fresh pages (docs/training.md)
    args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    quiet_libraries()
    try:
        return args.func(args)
    except HarnessError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted; rows already written are kept (harness run: the same command with --resume "
                          "continues the run)", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
