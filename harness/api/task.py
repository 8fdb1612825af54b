"""What a task is: a typed config, a version, the capabilities it needs, and the code that scores.

A task yields `Metric`s for one model; the runner turns them into result rows.
Pairwise tasks (e.g. `parity`) also get the model's reference through the
run context. Bump `version` whenever the scoring changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from harness.api.adapter import ModelAdapter
from harness.api.capabilities import Capability
from harness.api.config import coerce_config
from harness.api.errors import HarnessError
from harness.api.registry import TASKS
from harness.api.rows import Metric
from harness.api.store import DEFAULT_RESULTS_DIR

T = TypeVar("T")

@dataclass(frozen=True)
class MetricSpec:
    """How to read a metric: direction, and how close a scratch model must be to its reference."""

    higher_is_better: bool | None
    pair_atol: float = 0.0  # |scratch - reference| allowed when comparing a pair on identical weights
    pair_rtol: float = 0.0
    gate_atol: float = 0.0  # regression allowed against the baseline before the gate fails
    gate_rtol: float = 0.0
    threshold: float | None = None  # for diff-like metrics (parity): value must be <= threshold
    # How the report prints and judges it: count, flag, rate, perplexity, diff, loss or timing; None: read off
    # the metric's name (harness/report.py, `metric_kind`). Timings are judged apart, within a factor of 2.
    kind: str | None = None


@dataclass
class RunContext:
    """What the runner lends a task: seed, limit, the reference model, progress tracking."""

    seed: int
    limit: int | None
    device: str
    reference: Callable[[ModelAdapter], ModelAdapter | None]  # the same-weights reference, or None
    track: Callable[..., Iterable]  # track(iterable, total=..., description=...) -> iterable
    results_dir: str = DEFAULT_RESULTS_DIR
    # `harness run --resume`: is every row of this subtask already written? / the runner's note that it is
    completed: Callable[[str], bool] = lambda subtask: False
    on_done: Callable[[str], None] = lambda subtask: None

    def subtasks(self, items: Iterable[T], key: Callable[[T], str] = str) -> Iterator[T]:
        """A task's subtask loop that `harness run --resume` can continue: yields each item whose
        subtask (`key(item)`, the rows' `subtask`) a resumed run has not finished, and records it as
        finished when the loop body is done with it (every row it yielded written), so a killed run
        redoes only the subtask it was in. Subtasks must not depend on each other's state.

            for name in ctx.subtasks(self.config.subtasks):
                yield from self.run_subtask(model, name, ctx)
        """
        for item in items:
            name = key(item)
            if self.completed(name):
                continue
            yield item
            self.on_done(name)  # reached when the loop asks for the next item: the body finished


class Task:
    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type]
    needs: ClassVar[frozenset[Capability]] = frozenset()  # checked by `check`, before any work
    metrics: ClassVar[dict[str, MetricSpec]] = {}
    # The one metric the report's scorecard shows for this task (None: the report's choice, see harness/report.py)
    headline: ClassVar[str | None] = None
    # True when the unit of a scratch model also measures its reference and hands the reference's rows to
    # the reference's own unit (throughput): `harness run --resume` then redoes the two units together.
    measures_reference: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    def run(self, model: ModelAdapter, ctx: RunContext) -> Iterator[Metric]:
        raise NotImplementedError  # every registered task overrides this

    def validate(self) -> None:
        """Refuse, in one line (a `HarnessError`), a config that cannot work whatever the model: a bad
        range, a missing or unreadable file. Called by the runner for every task before any weights
        load; checks that need the model (e.g. a length against its maximum) belong in `run`."""

    def check(self, model: ModelAdapter) -> None:
        """Refuse, in one line and before any work, a model this task cannot score."""
        for capability in sorted(self.needs, key=lambda c: c.value):
            if not model.can(capability):
                raise HarnessError(self.refusal(model, capability))

    def refusal(self, model: ModelAdapter, capability: Capability) -> str:
        """The one-line error for a model that lacks `capability`; tasks may say more (which models can)."""
        have = ", ".join(sorted(c.value for c in model.capabilities)) or "nothing"
        return f"model '{model.name}' cannot '{capability.value}', which task '{self.name}' needs (it can: {have})"

    def metric(self, name: str, value: float, **kwargs: Any) -> Metric:
        return Metric(metric=name, value=float(value), higher_is_better=self.metrics[name].higher_is_better, **kwargs)

    @staticmethod
    def variant(config: dict) -> str:
        """A label for runs whose configs are different experiments, so the report keeps them apart
        (e.g. GLUE on a 3,000-example budget vs on the full training sets); "" for one kind of run."""
        return ""

    # A task with its own story to tell in the report (curves, recipe tables) defines
    #     @staticmethod
    #     def report_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str


def make_config(task: type[Task], overrides: dict[str, str]) -> Any:
    """The task's frozen config with `--set task.KEY=VALUE` overrides coerced to their declared types."""
    return coerce_config(task.config_class, overrides, task.name)


def metric_spec(task: str, metric: str, higher_is_better: bool | None) -> MetricSpec:
    """The registered task's spec for `metric`, or a plain one (direction only) for rows of unknown
    tasks or metrics, e.g. `harness train`'s."""

    if task in TASKS and metric in TASKS.get(task).metrics:
        return TASKS.get(task).metrics[metric]
    return MetricSpec(higher_is_better=higher_is_better)
