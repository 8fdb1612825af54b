"""Fit two noiseless regressions three ways, with SGD and with Adam.

Problems (parameters start from the same seeded values for every method):

* ``line``:      y = a x + b                      (a = 2, b = -3)
* ``quadratic``: y = w1 x1^2 + w2 x2^2 + b        (w1 = 1.5, w2 = -0.5, b = 0.25)

Methods: ``ours`` (the scalar engine of ``reproductions/autograd.py`` and its
optimisers), ``torch-raw`` (torch tensors and autograd, SGD/Adam updates written
by hand) and ``torch-nn`` (``nn.Linear`` plus ``torch.optim``).  All three compute
the same float64 arithmetic, so their loss curves lie on top of each other; the
experiment checks the engine end to end and shows SGD against Adam (Kingma & Ba
2015) on a well-conditioned problem.

    python -m reproductions.autograd_experiments [plot.png]
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import torch
from torch import nn

from reproductions import autograd as ag


@dataclass(frozen=True)
class Problem:
    name: str
    weights: tuple[tuple[str, float], ...]  # (name, true value) of each feature's weight
    bias: float  # true intercept, the parameter named "b"
    square: bool  # features are x_i^2 instead of x_i


PROBLEMS = (
    Problem("line", (("a", 2.0),), -3.0, square=False),
    Problem("quadratic", (("w1", 1.5), ("w2", -0.5)), 0.25, square=True),
)
OPTIMIZERS = {"sgd": dict(lr=0.5), "adam": dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8)}
METHODS = ("ours", "torch-raw", "torch-nn")


@dataclass(frozen=True)
class Data:
    features: list[list[float]]  # (n, F) inputs, already squared where the problem says so
    targets: list[float]  # (n,)
    init: list[float]  # F weights then the bias, shared by every method


def make_data(problem: Problem, seed: int, n: int = 32) -> Data:
    rng = random.Random(seed)
    width = len(problem.weights)
    raw = [[rng.uniform(-1, 1) for _ in range(width)] for _ in range(n)]
    features = [[x * x if problem.square else x for x in row] for row in raw]
    truth = [w for _, w in problem.weights]
    targets = [sum(w * f for w, f in zip(truth, row)) + problem.bias for row in features]
    return Data(features, targets, [rng.uniform(-1, 1) for _ in range(width + 1)])


# ---- the three methods: each returns (final parameters, loss per step) --------------------------
def fit_ours(data: Data, optimizer: str, steps: int) -> tuple[list[float], list[float]]:
    params = [ag.Value(v) for v in data.init]
    *weights, bias = params
    opt = (ag.SGD if optimizer == "sgd" else ag.Adam)(params, **OPTIMIZERS[optimizer])
    losses = []
    for _ in range(steps):
        preds = [bias + ag.vsum(w * f for w, f in zip(weights, row)) for row in data.features]
        loss = ag.vsum((p - y) ** 2 for p, y in zip(preds, data.targets)) / len(preds)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.data)
    return [p.data for p in params], losses


def fit_torch_raw(data: Data, optimizer: str, steps: int) -> tuple[list[float], list[float]]:
    x, y = torch.tensor(data.features, dtype=torch.float64), torch.tensor(data.targets, dtype=torch.float64)
    params = torch.tensor(data.init, dtype=torch.float64, requires_grad=True)  # F weights, then bias
    state = {"m": torch.zeros_like(params), "v": torch.zeros_like(params), "t": 0}
    losses = []
    for _ in range(steps):
        loss = ((x @ params[:-1] + params[-1] - y) ** 2).mean()
        params.grad = None
        loss.backward()
        with torch.no_grad():
            (_sgd_update if optimizer == "sgd" else _adam_update)(params, state, **OPTIMIZERS[optimizer])
        losses.append(loss.item())
    return params.tolist(), losses


def _sgd_update(p: torch.Tensor, state: dict, lr: float) -> None:
    p -= lr * p.grad


def _adam_update(p: torch.Tensor, state: dict, lr: float, betas: tuple[float, float], eps: float) -> None:
    b1, b2 = betas
    state["t"] += 1
    state["m"].mul_(b1).add_((1 - b1) * p.grad)
    state["v"].mul_(b2).add_((1 - b2) * p.grad**2)
    m_hat, v_hat = state["m"] / (1 - b1 ** state["t"]), state["v"] / (1 - b2 ** state["t"])
    p -= lr * m_hat / (v_hat.sqrt() + eps)


def fit_torch_nn(data: Data, optimizer: str, steps: int) -> tuple[list[float], list[float]]:
    x, y = torch.tensor(data.features, dtype=torch.float64), torch.tensor(data.targets, dtype=torch.float64)
    model = nn.Linear(x.shape[1], 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([data.init[:-1]]))
        model.bias.fill_(data.init[-1])
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = opt_cls(model.parameters(), **OPTIMIZERS[optimizer])
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return [*model.weight[0].tolist(), model.bias.item()], losses


FITTERS = {"ours": fit_ours, "torch-raw": fit_torch_raw, "torch-nn": fit_torch_nn}


# ---- orchestration -------------------------------------------------------------------------------
def run_experiments(
    seed: int = 0, steps: int = 300
) -> tuple[list[dict], dict[tuple[str, str, str], list[float]]]:
    """Rows (method, optimizer, problem, param, value, truth, final_loss) and loss curves keyed
    by (problem, optimizer, method); the loss recorded at a step is the one before its update."""
    torch.manual_seed(seed)  # nn.Linear draws an init that is then overwritten
    rows, curves = [], {}
    for problem in PROBLEMS:
        data = make_data(problem, seed)
        for optimizer in OPTIMIZERS:
            for method in METHODS:
                values, losses = FITTERS[method](data, optimizer, steps)
                curves[(problem.name, optimizer, method)] = losses
                rows += _rows(problem, optimizer, method, values, _mse(data, values))
    return rows, curves


def _rows(problem: Problem, optimizer: str, method: str, values: list[float], loss: float) -> list[dict]:
    names = [n for n, _ in problem.weights] + ["b"]
    truth = [w for _, w in problem.weights] + [problem.bias]
    common = dict(method=method, optimizer=optimizer, problem=problem.name)
    return [dict(common, param=n, value=v, truth=t, final_loss=loss) for n, v, t in zip(names, values, truth)]


def _mse(data: Data, params: list[float]) -> float:
    """Loss of the final parameters (after the last update)."""
    *w, b = params
    errors = [sum(wi * f for wi, f in zip(w, row)) + b - y for row, y in zip(data.features, data.targets)]
    return sum(e * e for e in errors) / len(errors)


def plot_curves(curves: dict[tuple[str, str, str], list[float]], path: str) -> None:
    """One panel per problem: loss (log scale) per step, colour = optimiser, line style = method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({p for p, _, _ in curves}, key=[q.name for q in PROBLEMS].index)
    fig, axes = plt.subplots(1, len(problems), figsize=(5 * len(problems), 3.8), squeeze=False)
    colours, styles = (
        {"sgd": "tab:blue", "adam": "tab:orange"},
        {"ours": "-", "torch-raw": "--", "torch-nn": ":"},
    )
    for ax, problem in zip(axes[0], problems):
        for (p, opt, method), losses in curves.items():
            if p == problem:
                ax.plot(losses, color=colours[opt], linestyle=styles[method], label=f"{opt} / {method}")
        ax.set(yscale="log", title=problem, xlabel="step", ylabel="MSE loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    """Markdown table of final parameters against the truth."""
    lines = ["| problem | optimizer | method | param | value | truth | final loss |", "|---" * 7 + "|"]
    for r in rows:
        cells = [
            r["problem"],
            r["optimizer"],
            r["method"],
            r["param"],
            f"{r['value']:.9f}",
            f"{r['truth']:g}",
        ]
        lines.append("| " + " | ".join(cells) + f" | {r['final_loss']:.3e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    rows, curves = run_experiments()
    print(format_table(rows))
    plot_curves(curves, sys.argv[1] if len(sys.argv) > 1 else "autograd_curves.png")
