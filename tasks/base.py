"""What a task is: a typed config, a version, the capabilities it needs, and the code that scores.

A task yields `Metric`s for one model; the runner turns them into result rows.
Pairwise tasks (e.g. `parity`) also get the model's reference through the
run context. Bump `version` whenever the scoring changes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from harness.adapter import Capability, ModelAdapter
from harness.errors import HarnessError, UnknownNameError
from harness.results import Metric

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class MetricSpec:
    """How to read a metric: direction, and how close a scratch model must be to its reference."""

    higher_is_better: bool | None
    pair_atol: float = 0.0  # |scratch - reference| allowed when comparing a pair on identical weights
    pair_rtol: float = 0.0
    gate_atol: float = 0.0  # regression allowed against the baseline before the gate fails
    gate_rtol: float = 0.0
    threshold: float | None = None  # for diff-like metrics (parity): value must be <= threshold


@dataclass
class RunContext:
    """What the runner lends a task: seed, limit, the reference model, progress tracking."""

    seed: int
    limit: int | None
    device: str
    reference: Callable[[ModelAdapter], ModelAdapter | None]  # the same-weights reference, or None
    track: Callable[..., Iterable]  # track(iterable, total=..., description=...) -> iterable
    results_dir: str = "results"


class Task:
    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type]
    needs: ClassVar[frozenset[Capability]] = frozenset()
    metrics: ClassVar[dict[str, MetricSpec]] = {}

    def __init__(self, config: Any) -> None:
        self.config = config

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        raise NotImplementedError  # every registered task overrides this

    def check(self, model: ModelAdapter) -> None:
        for capability in sorted(self.needs, key=lambda c: c.value):
            model.require(capability, task=self.name)

    def metric(self, name: str, value: float, **kwargs: Any) -> Metric:
        return Metric(metric=name, value=float(value), higher_is_better=self.metrics[name].higher_is_better, **kwargs)

    @staticmethod
    def variant(config: dict) -> str:
        """A label for runs whose configs are different experiments, so the report keeps them apart
        (e.g. GLUE on a 3,000-example budget vs on the full training sets); "" for one kind of run."""
        return ""


# -- typed config overrides: --set TASK.KEY=VALUE ----------------------------------------------------


def config_fields(config_class: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


def make_config(task: type[Task], overrides: dict[str, str]) -> Any:
    """Build the task's frozen config from string overrides, coercing each to its declared type."""
    fields = config_fields(task.config_class)
    values = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise UnknownNameError(
                f"unknown key '{task.name}.{key}'; known keys: " + ", ".join(f"{task.name}.{k}" for k in fields)
            )
        values[key] = coerce(raw, fields[key], f"{task.name}.{key}")
    return task.config_class(**values)


def coerce(raw: str, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw.lower() in ("none", "null", "") and len(options) < len(typing.get_args(typ)):
            return None
        return coerce(raw, options[0], where)
    if origin is tuple:
        inner = typing.get_args(typ)[0]
        return tuple(coerce(part.strip(), inner, where) for part in raw.split(",") if part.strip())
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise HarnessError(f"{where}={raw!r}: expected true or false")
    if origin is typing.Literal:
        if raw not in typing.get_args(typ):
            raise HarnessError(f"{where}={raw!r}: expected one of {', '.join(map(str, typing.get_args(typ)))}")
        return raw
    try:
        return typ(raw)
    except (TypeError, ValueError) as e:
        raise HarnessError(f"{where}={raw!r}: expected {getattr(typ, '__name__', typ)}") from e


def parse_overrides(items: list[str], known_tasks: list[str]) -> dict[str, dict[str, str]]:
    """["ppl.stride=512", ...] -> {"ppl": {"stride": "512"}}; unknown tasks list the known ones."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        task, dot, field_name = key.partition(".")
        if not eq or not dot or not field_name:
            raise HarnessError(f"--set {item!r}: expected TASK.KEY=VALUE, e.g. ppl.stride=512")
        if task not in known_tasks:
            raise UnknownNameError(f"unknown task '{task}' in --set {item!r}; known tasks: {', '.join(known_tasks)}")
        out.setdefault(task, {})[field_name] = value
    return out


# -- report helpers ---------------------------------------------------------------------------------


def ci_cell(block: pd.DataFrame) -> str:
    """The newest row of `block` as a percentage with its 95% interval, "81.2 [77.8, 84.8]" ("-": no row)."""
    if block.empty:
        return "-"
    row = block.iloc[-1]
    extra = row["extra"] if isinstance(row["extra"], dict) else {}
    if extra.get("ci_low") is not None:
        return f"{100 * row['value']:.1f} [{100 * extra['ci_low']:.1f}, {100 * extra['ci_high']:.1f}]"
    return f"{100 * row['value']:.1f}"
