"""A scalar reverse-mode automatic differentiation engine, small networks and two optimisers.

Reverse mode (backpropagation) goes back to Linnainmaa 1970 and Rumelhart, Hinton &
Williams 1986, "Learning representations by back-propagating errors"; Baydin et al.
2018, "Automatic Differentiation in Machine Learning: a Survey", is the reference
for the vocabulary used here.

Design: every ``Value`` stores its parents together with the *local* partial
derivative of itself with respect to each parent, computed in the forward pass
(one entry of a Wengert list).  ``backward`` orders the graph topologically and
applies the chain rule once per edge, ``parent.grad += local * node.grad``, from
the output back to the leaves.  Gradients accumulate in leaves across calls (as
in torch); call ``zero_grad`` between steps.

Optimisers: plain/momentum SGD (torch's formulation, Polyak 1964 momentum) and
Adam with bias correction (Kingma & Ba 2015, "Adam: A Method for Stochastic
Optimization", Algorithm 1).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

Number = int | float


class Value:
    """A scalar node in a computation graph."""

    __slots__ = ("data", "grad", "_parents", "_local", "op")

    def __init__(
        self, data: Number, parents: tuple[Value, ...] = (), local: tuple[float, ...] = (), op: str = ""
    ):
        self.data = float(data)
        self.grad = 0.0
        self._parents = parents
        self._local = local  # d(self) / d(parent), one per parent
        self.op = op

    def __repr__(self) -> str:
        return f"Value(data={self.data:.6g}, grad={self.grad:.6g}{', op=' + self.op if self.op else ''})"

    # ---- arithmetic ----------------------------------------------------------------------------
    def __add__(self, other: Value | Number) -> Value:
        other = lift(other)
        return Value(self.data + other.data, (self, other), (1.0, 1.0), "+")

    def __mul__(self, other: Value | Number) -> Value:
        other = lift(other)
        return Value(self.data * other.data, (self, other), (other.data, self.data), "*")

    def __neg__(self) -> Value:
        return Value(-self.data, (self,), (-1.0,), "neg")

    def __sub__(self, other: Value | Number) -> Value:
        return self + (-lift(other))

    def __truediv__(self, other: Value | Number) -> Value:
        return self * lift(other) ** -1

    def __pow__(self, exponent: Value | Number) -> Value:
        if isinstance(exponent, Value):
            return self._pow_value(exponent)
        out = self.data**exponent
        if isinstance(out, complex):
            raise ValueError(f"{self.data} ** {exponent} is not real")
        return Value(out, (self,), (exponent * self.data ** (exponent - 1),), f"**{exponent}")

    def _pow_value(self, exponent: Value) -> Value:
        """a ** b with both differentiable: d/da = b a**(b-1), d/db = a**b log a (needs a > 0)."""
        if self.data <= 0:
            raise ValueError(f"Value ** Value needs a positive base (got {self.data})")
        out = self.data**exponent.data
        local = (exponent.data * self.data ** (exponent.data - 1), out * math.log(self.data))
        return Value(out, (self, exponent), local, "**")

    __radd__ = __add__
    __rmul__ = __mul__

    def __rsub__(self, other: Number) -> Value:
        return lift(other) - self

    def __rtruediv__(self, other: Number) -> Value:
        return lift(other) / self

    def __rpow__(self, base: Number) -> Value:
        return lift(base) ** self

    # ---- elementary functions ------------------------------------------------------------------
    def exp(self) -> Value:
        e = math.exp(self.data)
        return Value(e, (self,), (e,), "exp")

    def log(self) -> Value:
        if self.data <= 0:
            raise ValueError(f"log needs a positive argument (got {self.data})")
        return Value(math.log(self.data), (self,), (1.0 / self.data,), "log")

    def tanh(self) -> Value:
        t = math.tanh(self.data)
        return Value(t, (self,), (1.0 - t * t,), "tanh")

    def relu(self) -> Value:
        return Value(max(self.data, 0.0), (self,), (1.0 if self.data > 0 else 0.0,), "relu")

    # ---- reverse pass --------------------------------------------------------------------------
    def backward(self) -> None:
        """Add d(self)/d(leaf) to every leaf's grad; interior grads are recomputed from zero."""
        order = self.topological_order()
        for node in order:
            if node._parents:
                node.grad = 0.0
        self.grad += 1.0
        for node in reversed(order):
            for parent, local in zip(node._parents, node._local):
                parent.grad += local * node.grad

    def topological_order(self) -> list[Value]:
        """Every node reachable from self, parents before children (iterative DFS, no recursion limit)."""
        order: list[Value] = []
        seen: set[int] = set()
        stack: list[tuple[Value, bool]] = [(self, False)]
        while stack:
            node, finished = stack.pop()
            if finished:
                order.append(node)
            elif id(node) not in seen:
                seen.add(id(node))
                stack.append((node, True))
                stack.extend((p, False) for p in node._parents if id(p) not in seen)
        return order


def lift(x: Value | Number) -> Value:
    """Wrap a constant as a leaf Value (no-op for a Value)."""
    return x if isinstance(x, Value) else Value(x)


def vsum(values: Iterable[Value | Number]) -> Value:
    """Sum of values as one chain of + nodes."""
    total = Value(0.0)
    for v in values:
        total = total + v
    return total


# ---- networks -----------------------------------------------------------------------------------
ACTIVATIONS = {"tanh": Value.tanh, "relu": Value.relu, "linear": lambda v: v}


class Module:
    def parameters(self) -> list[Value]:
        return []

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = 0.0


class Neuron(Module):
    """act(w . x + b); weights ~ U(-1/sqrt(nin), 1/sqrt(nin)) as in torch.nn.Linear, bias 0."""

    def __init__(self, nin: int, activation: str = "tanh", rng: random.Random | None = None) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        rng = rng or random.Random(0)
        bound = 1.0 / math.sqrt(nin)
        self.w = [Value(rng.uniform(-bound, bound)) for _ in range(nin)]
        self.b = Value(0.0)
        self.activation = activation

    def __call__(self, x: Sequence[Value | Number]) -> Value:
        pre = self.b + vsum(wi * xi for wi, xi in zip(self.w, x))
        return ACTIVATIONS[self.activation](pre)

    def parameters(self) -> list[Value]:
        return [*self.w, self.b]


class Layer(Module):
    def __init__(
        self, nin: int, nout: int, activation: str = "tanh", rng: random.Random | None = None
    ) -> None:
        rng = rng or random.Random(0)
        self.neurons = [Neuron(nin, activation, rng) for _ in range(nout)]

    def __call__(self, x: Sequence[Value | Number]) -> list[Value]:
        return [n(x) for n in self.neurons]

    def parameters(self) -> list[Value]:
        return [p for n in self.neurons for p in n.parameters()]


class MLP(Module):
    """Hidden layers with ``activation``, a linear output layer; seeded initialisation."""

    def __init__(self, nin: int, sizes: Sequence[int], activation: str = "tanh", seed: int = 0) -> None:
        rng = random.Random(seed)
        widths = [nin, *sizes]
        acts = [activation] * (len(sizes) - 1) + ["linear"]
        self.layers = [Layer(a, b, act, rng) for a, b, act in zip(widths, widths[1:], acts)]

    def __call__(self, x: Sequence[Value | Number]) -> list[Value]:
        for layer in self.layers:
            x = layer(x)
        return x

    def parameters(self) -> list[Value]:
        return [p for layer in self.layers for p in layer.parameters()]


# ---- optimisers ---------------------------------------------------------------------------------
class SGD:
    """p -= lr * buf, buf = momentum * buf + grad (torch.optim.SGD without dampening)."""

    def __init__(self, params: Iterable[Value], lr: float, momentum: float = 0.0) -> None:
        self.params, self.lr, self.momentum = list(params), lr, momentum
        self.buf = [0.0] * len(self.params)

    def step(self) -> None:
        for i, p in enumerate(self.params):
            self.buf[i] = self.momentum * self.buf[i] + p.grad
            p.data -= self.lr * self.buf[i]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = 0.0


class Adam:
    """Kingma & Ba 2015, Algorithm 1: moment estimates with bias correction."""

    def __init__(
        self,
        params: Iterable[Value],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.m = [0.0] * len(self.params)
        self.v = [0.0] * len(self.params)
        self.t = 0

    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for i, p in enumerate(self.params):
            self.m[i] = b1 * self.m[i] + (1 - b1) * p.grad
            self.v[i] = b2 * self.v[i] + (1 - b2) * p.grad**2
            m_hat = self.m[i] / (1 - b1**self.t)
            v_hat = self.v[i] / (1 - b2**self.t)
            p.data -= self.lr * m_hat / (math.sqrt(v_hat) + self.eps)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = 0.0
