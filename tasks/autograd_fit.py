"""Task `autograd-fit`: fit two noiseless regressions by gradient descent, three ways.

The experiment of reproductions/autograd_experiments.py, one model per method:
`autograd-scratch` (our scalar reverse-mode engine and its SGD/Adam, reproductions/autograd.py),
`autograd-torch` (torch tensors and torch.autograd, SGD/Adam updates written by hand) and
`autograd-torch-nn` (torch.nn.Linear with torch.optim.SGD/Adam). Problems: `line`
(y = 2x - 3) and `quadratic` (y = 1.5 x1^2 - 0.5 x2^2 + 0.25), 32 points each; every method
starts from the same seeded parameters and computes the same float64 arithmetic, so the three
should agree to rounding error. Optimisers: SGD (lr 0.5) and Adam (Kingma & Ba 2015; lr 0.05).

Metrics: `abs_param_error` |fitted - true| per parameter (subtask `problem/optimizer/param`,
`extra` holds the fitted and true values) and `final_loss`, the mean squared error of the final
parameters (subtask `problem/optimizer`; `extra.loss_curve` holds the loss before every update).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.api import (
    TASKS,
    Capability,
    Fitter,
    Metric,
    MetricSpec,
    ModelAdapter,
    RunContext,
    Task,
    UnknownNameError,
)
from reproductions import autograd_experiments as ax
from tasks.common import FITTERS


@dataclass(frozen=True)
class AutogradFitConfig:
    steps: int = 300  # updates per fit
    problems: tuple[str, ...] = ("line", "quadratic")
    optimizers: tuple[str, ...] = ("sgd", "adam")
    points: int = 32  # data points per problem


class AutogradFit(Task):
    name = "autograd-fit"
    version = "1.0"
    description = "fit y = 2x - 3 and a quadratic with SGD and Adam: our autograd engine vs torch"
    config_class = AutogradFitConfig
    needs = frozenset({Capability.FIT})
    metrics = {
        "abs_param_error": MetricSpec(higher_is_better=False, pair_atol=1e-9, gate_atol=1e-6),
        "final_loss": MetricSpec(higher_is_better=False, pair_atol=1e-9, pair_rtol=1e-6, gate_atol=1e-6),
    }

    def refusal(self, model: ModelAdapter, capability: Capability) -> str:
        return f"{self.name} runs its own fitters; '{model.name}' is not one of: {', '.join(FITTERS)}"

    def problems(self) -> list[ax.Problem]:
        known = {p.name: p for p in ax.PROBLEMS}
        for name in self.config.problems:
            if name not in known:
                raise UnknownNameError(f"unknown problem '{name}' in {self.name}.problems; known: {', '.join(known)}")
        for opt in self.config.optimizers:
            if opt not in ax.OPTIMIZERS:
                raise UnknownNameError(f"unknown optimizer '{opt}' in {self.name}.optimizers; known: "
                                       + ", ".join(ax.OPTIMIZERS))
        return [known[name] for name in self.config.problems]

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        for problem in self.problems():
            data = ax.make_data(problem, ctx.seed, n=self.config.points)
            for optimizer in self.config.optimizers:
                values, losses = model.fit(data, optimizer, self.config.steps)
                yield from self.score(problem, optimizer, model, data, values, losses)

    def score(self, problem: ax.Problem, optimizer: str, model: Fitter, data: ax.Data,
              values: list[float], losses: list[float]) -> Iterator[Metric]:
        sub, method = f"{problem.name}/{optimizer}", model.method
        truths = [*problem.weights, ("b", problem.bias)]  # the order of `values`: weights, then the bias
        for (param, truth), value in zip(truths, values):
            yield self.metric("abs_param_error", abs(value - truth), subtask=f"{sub}/{param}", n=len(data.targets),
                              extra={"method": method, "param": param, "value": value, "truth": truth})
        yield self.metric("final_loss", mse(data, values), subtask=sub, n=len(data.targets),
                          extra={"method": method, "loss_curve": losses})

    @staticmethod
    def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
        return autograd_section(history, Path(fig_dir), Path(report_dir))


def mse(data: ax.Data, params: list[float]) -> float:
    """Mean squared error of the final parameters (F weights, then the bias)."""
    *w, b = params
    errors = [sum(wi * f for wi, f in zip(w, row)) + b - y for row, y in zip(data.features, data.targets)]
    return sum(e * e for e in errors) / len(errors)


def autograd_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
    """Fitted parameters against the truth for every method, and the loss curves (SGD vs Adam)."""
    from harness.api import latest

    rows = latest(history)
    if rows.empty:
        return ""
    losses = {_key(r["subtask"], r["extra"]["method"]): r for _, r in rows[rows["metric"] == "final_loss"].iterrows()}
    table = [_table_row(r, losses) for _, r in rows[rows["metric"] == "abs_param_error"].iterrows()]
    table.sort(key=_table_order)
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / "autograd_fit_curves.png"
    ax.plot_curves({k: r["extra"]["loss_curve"] for k, r in losses.items()}, str(path))
    rel = path.relative_to(report_dir) if path.is_relative_to(report_dir) else path
    return "\n".join(["### Fitted parameters against the truth", "", ax.format_table(table), "",
                      "### Loss curves (colour: optimiser, line style: method)", "",
                      f"![autograd loss curves]({rel.as_posix()})", ""])


def _key(subtask: str, method: str) -> tuple[str, str, str]:
    problem, optimizer = subtask.split("/")[:2]
    return problem, optimizer, method


def _table_row(r: pd.Series, losses: dict) -> dict:
    e = r["extra"]
    problem, optimizer, method = _key(r["subtask"], e["method"])
    return dict(problem=problem, optimizer=optimizer, method=method, param=e["param"], value=e["value"],
                truth=e["truth"], final_loss=losses[(problem, optimizer, method)]["value"])


def _table_order(row: dict) -> tuple:
    rank = lambda seq, item: seq.index(item) if item in seq else len(seq)  # noqa: E731
    return (rank([p.name for p in ax.PROBLEMS], row["problem"]), rank(list(ax.OPTIMIZERS), row["optimizer"]),
            row["param"] == "b", row["param"], rank(list(ax.METHODS), row["method"]))


TASKS.add(AutogradFit.name, AutogradFit.description, AutogradFit)
