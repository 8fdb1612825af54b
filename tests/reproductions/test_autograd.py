import math
import random

import pytest
import torch

from reproductions.autograd import MLP, SGD, Adam, Value, vsum
from reproductions.autograd_experiments import METHODS, OPTIMIZERS, plot_curves, run_experiments

# Every op is written once and runs on both engines: Value and 0-d float64 torch tensors share
# the operators and the method names exp/log/tanh/relu.  Arguments are squashed where an op has
# a restricted domain, so any random pick is valid.
UNARY = {
    "neg": lambda a: -a,
    "exp": lambda a: a.tanh().exp(),
    "log": lambda a: (a * a + 0.5).log(),
    "tanh": lambda a: a.tanh(),
    "relu": lambda a: a.relu(),
    "square": lambda a: a**2,
    "sqrt": lambda a: (a * a + 1) ** 0.5,
    "rsub": lambda a: 1 - a,
    "rmul": lambda a: 2.5 * a,
    "rdiv": lambda a: 3 / (a * a + 1),
    "radd": lambda a: 0.5 + a,
    "rpow": lambda a: 2 ** a.tanh(),
    "sub-const": lambda a: a - 0.25,
    "div-const": lambda a: a / 4,
}
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (b * b + 1),
    "pow": lambda a, b: (a * a + 1) ** b.tanh(),
}


def random_program(seed: int, leaves: int = 4, ops: int = 25) -> list[tuple[str, tuple[int, ...]]]:
    """A random DAG: each op reads earlier nodes (shared freely), so gradients must accumulate."""
    rng = random.Random(seed)
    program = []
    for i in range(ops):
        size = leaves + i
        if rng.random() < 0.5:
            program.append((rng.choice(sorted(UNARY)), (rng.randrange(size),)))
        else:
            program.append((rng.choice(sorted(BINARY)), (rng.randrange(size), rng.randrange(size))))
    return program


def run_program(program, leaves):
    nodes = list(leaves)
    for name, args in program:
        fn = UNARY.get(name) or BINARY[name]
        nodes.append(fn(*(nodes[i] for i in args)))
    return nodes[-1] + nodes[-2] * nodes[-3]  # several outputs feed the result


@pytest.mark.parametrize("seed", range(40), ids=lambda s: f"graph{s}")
def test_gradients_match_torch_autograd(seed):
    rng = random.Random(1000 + seed)
    xs = [rng.uniform(-2, 2) for _ in range(4)]
    ours = [Value(x) for x in xs]
    theirs = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    program = random_program(seed)
    out, ref = run_program(program, ours), run_program(program, theirs)
    out.backward()
    ref.backward()
    assert out.data == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
    for v, t in zip(ours, theirs):
        expected = 0.0 if t.grad is None else t.grad.item()
        assert v.grad == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", sorted(UNARY) + sorted(BINARY))
def test_every_op_against_torch(name):
    xs = [0.7, -1.3]
    ours = [Value(x) for x in xs]
    theirs = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    fn = UNARY.get(name) or BINARY[name]
    arity = 1 if name in UNARY else 2
    out, ref = fn(*ours[:arity]), fn(*theirs[:arity])
    out.backward()
    ref.backward()
    assert out.data == pytest.approx(ref.item(), rel=1e-12)
    for v, t in zip(ours[:arity], theirs[:arity]):
        assert v.grad == pytest.approx(t.grad.item(), rel=1e-9, abs=1e-12)


def test_shared_node_accumulates_and_leaves_accumulate_across_calls():
    x = Value(3.0)
    y = x * x + x  # dy/dx = 2x + 1 = 7
    y.backward()
    assert x.grad == 7.0
    y.backward()  # leaves accumulate, interior nodes are recomputed
    assert x.grad == 14.0


def test_deep_chain_needs_no_recursion():
    x = Value(0.5)
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.backward()
    assert x.grad == pytest.approx(1.0001**5000)


def test_domain_errors_are_one_line_messages():
    with pytest.raises(ValueError, match="positive argument"):
        Value(-1.0).log()
    with pytest.raises(ValueError, match="positive base"):
        Value(-2.0) ** Value(0.5)


def _torch_mlp_from(mlp: MLP) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same weights as float64 torch leaves, one (W, b) per layer."""
    layers = []
    for layer in mlp.layers:
        w = torch.tensor([[p.data for p in n.w] for n in layer.neurons], dtype=torch.float64)
        b = torch.tensor([n.b.data for n in layer.neurons], dtype=torch.float64)
        layers.append((w.requires_grad_(), b.requires_grad_()))
    return layers


def _torch_forward(layers, x: torch.Tensor) -> torch.Tensor:
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        x = torch.tanh(x) if i < len(layers) - 1 else x
    return x


def _data(n: int = 8):
    rng = random.Random(0)
    xs = [[rng.uniform(-1, 1) for _ in range(3)] for _ in range(n)]
    ys = [math.sin(a) + b * c for a, b, c in xs]
    return xs, ys


def _our_loss(mlp, xs, ys) -> Value:
    return vsum((mlp(x)[0] - y) ** 2 for x, y in zip(xs, ys)) / len(xs)


def test_mlp_forward_and_gradients_match_torch():
    mlp = MLP(3, [5, 4, 1], seed=1)
    layers = _torch_mlp_from(mlp)
    xs, ys = _data()
    loss = _our_loss(mlp, xs, ys)
    loss.backward()
    pred = _torch_forward(layers, torch.tensor(xs, dtype=torch.float64))[:, 0]
    ref = ((pred - torch.tensor(ys, dtype=torch.float64)) ** 2).mean()
    ref.backward()
    assert loss.data == pytest.approx(ref.item(), rel=1e-12)
    ours = [p.grad for p in mlp.parameters()]
    theirs = [g for w, b in layers for row, bi in zip(w.grad, b.grad) for g in [*row.tolist(), bi.item()]]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda p: Adam(p, lr=0.05), lambda p: torch.optim.Adam(p, lr=0.05)),
        (
            lambda p: Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
            lambda p: torch.optim.Adam(p, 0.01, (0.8, 0.99), 1e-6),
        ),
        (lambda p: SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (lambda p: SGD(p, lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    ],
    ids=["adam", "adam-betas", "sgd", "sgd-momentum"],
)
def test_optimizer_matches_torch_step_for_step(ours, theirs):
    mlp = MLP(3, [4, 1], seed=2)
    layers = _torch_mlp_from(mlp)
    xs, ys = _data()
    opt, ref_opt = ours(mlp.parameters()), theirs([t for pair in layers for t in pair])
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    for _ in range(30):
        opt.zero_grad()
        _our_loss(mlp, xs, ys).backward()
        opt.step()
        ref_opt.zero_grad()
        ((_torch_forward(layers, x)[:, 0] - y) ** 2).mean().backward()
        ref_opt.step()
        got = [p.data for p in mlp.parameters()]
        want = [v for w, b in layers for row, bi in zip(w, b) for v in [*row.tolist(), bi.item()]]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_mlp_initialisation_is_seeded():
    a, b, c = MLP(2, [3, 1], seed=4), MLP(2, [3, 1], seed=4), MLP(2, [3, 1], seed=5)
    assert [p.data for p in a.parameters()] == [p.data for p in b.parameters()]
    assert [p.data for p in a.parameters()] != [p.data for p in c.parameters()]
    assert len(a.parameters()) == 3 * 3 + 4


def test_experiments_agree_across_methods_and_plot(tmp_path):
    rows, curves = run_experiments(seed=0, steps=40)
    assert {(r["method"], r["optimizer"], r["problem"]) for r in rows} == {
        (m, o, p) for m in METHODS for o in OPTIMIZERS for p in ("line", "quadratic")
    }
    by_key = {}
    for r in rows:
        by_key.setdefault((r["problem"], r["optimizer"], r["param"]), []).append(r["value"])
    for values in by_key.values():  # the same float64 arithmetic up to summation order
        assert max(values) - min(values) < 1e-8
    assert all(len(c) == 40 and c[-1] < c[0] for c in curves.values())
    plot_curves(curves, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_experiments_recover_the_true_parameters():
    rows, _ = run_experiments(seed=0)
    assert all(abs(r["value"] - r["truth"]) < 1e-4 and r["final_loss"] < 1e-9 for r in rows)
