"""One generic registry, instantiated once for models, once for tasks and once for report sections.

    @TASKS.register("ppl", "WikiText-2 perplexity")
    class Perplexity(Task): ...

    MODELS.add("gpt2-scratch", "GPT-2 from scratch", ModelSpec(...))

Entries are typed (`Registry[ModelSpec]`, `Registry[type[Task]]`) and loaded lazily: the first
lookup in a registry imports that kind's plugin modules (the harness's own `harness.models` and `tasks.catalog`, and
every module an installed package declares under the entry-point groups `lm_repro_harness.models`
and `lm_repro_harness.tasks`, and the modules named in `HARNESS_PLUGINS`, comma-separated, e.g.
`HARNESS_PLUGINS=examples/plugin_task.py harness run ...`). Nothing in the harness core imports a
task or a concrete adapter by name. Unknown names raise `UnknownNameError` listing every valid
name; registering a name twice is a programming error.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Generic, TypeVar

from harness.api.errors import HarnessError, UnknownNameError

T = TypeVar("T")

# The harness's own plugins, as module names: importing one registers what it defines. Each registry
# loads its own kind only (a model lookup does not import the tasks, ~2.5 s of scipy and friends).
PLUGINS_OF = {"model": ("harness.models",), "task": ("tasks.catalog",), "report section": ("harness.train.report",)}
GROUP_OF = {"model": "lm_repro_harness.models", "task": "lm_repro_harness.tasks"}
BUILTIN_PLUGINS = tuple(m for modules in PLUGINS_OF.values() for m in modules)
ENTRY_POINT_GROUPS = tuple(GROUP_OF.values())


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    description: str
    obj: T


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, description, obj)
            return obj

        return decorator

    def add(self, name: str, description: str, obj: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = Entry(name, description, obj)

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        load_plugins(self.kind)
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} '{name}'; known {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        load_plugins(self.kind)
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        load_plugins(self.kind)
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())


class ModelRegistry(Registry):
    """The model registry, which also resolves a model that is not registered by name: a user's file or
    module (`--model PATH.py:NAME` / `--model package.module:NAME`, docs/bring-your-own.md) or a factory an
    installed package declares under the entry-point group `lm_repro_harness.models` (`name = "pkg.mod:NAME"`).
    The resolvers are plugins (`harness.models.user` adds one), so the core imports no adapter."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self._resolvers: list[Callable[[str, str | None], object | None]] = []
        self._resolved: dict[tuple[str, str | None], object] = {}
        self.factories: dict[str, str] = {}  # entry-point name -> "pkg.mod:NAME", a NAME(hf_config) factory
        self._last: dict[str, object] = {}  # name -> the spec resolved last for it

    def add_resolver(self, resolver: Callable[[str, str | None], object | None]) -> None:
        """`resolver(name, reference)` returns a ModelSpec for a name it understands, None otherwise, or
        raises a one-line HarnessError (missing --reference, no such file, NAME not callable, ...)."""
        self._resolvers.append(resolver)

    def add_factory(self, name: str, target: str) -> None:
        if name in self._entries or name in self.factories:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self.factories[name] = target

    def resolve(self, name: str, reference: str | None = None):
        """The ModelSpec for `--model name [--reference reference]`.

        A registered name returns its spec; `reference` may only repeat the model's own reference (e.g.
        `gpt2-scratch --reference gpt2-hf`), anything else is refused. Any other name (`PATH.py:NAME`,
        `package.module:NAME`, an entry-point factory) goes to the resolvers; the spec they return is cached
        per (name, reference), so the file is imported once per process. Unknown: the usual one-line error."""
        load_plugins(self.kind)
        if name in self._entries:
            spec = self._entries[name].obj
            own = spec.info.reference
            if reference is not None and reference != own:
                raise HarnessError(f"--reference {reference}: model '{name}' is registered with reference "
                                   f"{own or 'none (it is a reference itself)'}; drop --reference")
            return spec
        key = (name, reference)
        if key not in self._resolved:
            for resolver in self._resolvers:
                spec = resolver(name, reference)
                if spec is not None:
                    self._resolved[key] = spec
                    break
            else:
                raise UnknownNameError(f"unknown {self.kind} '{name}'; known {self.kind}s: {', '.join(self.names())}"
                                       " (or your own: --model PATH.py:NAME --reference REF)")
        self._last[name] = self._resolved[key]
        return self._resolved[key]

    def entry(self, name: str) -> Entry:
        """A registered model, or the spec `resolve` returned last for this name (so a command that has
        resolved `PATH.py:NAME` once can look it up by name like any other model)."""
        load_plugins(self.kind)
        if name not in self._entries and name in self._last:
            spec = self._last[name]
            return Entry(name, f"your model, held to {spec.info.reference}", spec)
        return super().entry(name)


MODELS: ModelRegistry = ModelRegistry("model")  # name -> harness.api.adapter.ModelSpec
TASKS: Registry = Registry("task")  # name -> a harness.api.task.Task subclass
# Rows written by a command rather than by a task (e.g. `harness train`) get their report section here:
# name -> (history DataFrame, figure dir, report dir) -> markdown.
REPORT_SECTIONS: Registry = Registry("report section")

_loaded: set[str] = set()  # kinds whose plugins are imported
_loading: set[str] = set()


def load_plugins(kind: str | None = None) -> None:
    """Import the plugin modules of one kind ("model", "task", "report section"), or of every kind, once
    (idempotent; the registries call it on first use). HARNESS_PLUGINS modules, which may register
    anything, come with every kind."""
    for k in [kind] if kind else list(PLUGINS_OF):
        if k in _loaded or k in _loading:
            continue
        _loading.add(k)
        try:
            for module in PLUGINS_OF.get(k, ()):
                importlib.import_module(module)
            if k in GROUP_OF:
                for ep in metadata.entry_points(group=GROUP_OF[k]):
                    _load_entry_point(ep)
            for module in filter(None, (m.strip() for m in os.environ.get("HARNESS_PLUGINS", "").split(","))):
                _import_plugin(module)
            _loaded.add(k)
        finally:
            _loading.discard(k)


def _import_plugin(module: str) -> None:
    """A module name (`my_pkg.tasks`) or a Python file (`examples/plugin_task.py`)."""
    try:
        if module.endswith(".py"):
            _import_file(Path(module))
        else:
            importlib.import_module(module)
    except (ImportError, OSError) as e:
        raise HarnessError(f"HARNESS_PLUGINS: cannot import '{module}' ({e}); give module names or .py files, "
                           "comma-separated, e.g. HARNESS_PLUGINS=examples/plugin_task.py") from e


def _import_file(path: Path) -> None:
    name = f"harness_plugin_{path.stem}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"no such file: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _load_entry_point(ep: metadata.EntryPoint) -> None:
    if ep.value.split(":")[0] in BUILTIN_PLUGINS:
        return
    try:
        loaded = ep.load()
        if ep.group == "lm_repro_harness.models" and ep.attr:  # `name = "pkg.mod:NAME"`: a user factory
            MODELS.add_factory(ep.name, ep.value)
            if not callable(loaded):
                raise TypeError(f"{ep.value} is not callable; it must be NAME(hf_config) -> torch.nn.Module")
    except Exception as e:  # a broken third-party plugin must not take the harness down with a traceback
        raise HarnessError(f"plugin '{ep.name}' ({ep.value}, group {ep.group}) failed to load: {e}") from e
