"""One generic registry, instantiated once for models and once for tasks.

    @MODELS.register("gpt2-scratch", "GPT-2 written from scratch (reproductions/gpt2.py)")
    def build_gpt2_scratch(...): ...

Unknown names raise UnknownNameError listing every valid name; registering a
name twice is a programming error.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from harness.errors import UnknownNameError

T = TypeVar("T")


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
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} '{name}'; known {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())


MODELS: Registry = Registry("model")
TASKS: Registry = Registry("task")

# Modules whose import registers models and tasks. Kept as strings so that
# importing the registry stays cheap and free of import cycles.
_PLUGIN_MODULES = ("harness.models", "tasks.catalog")


def load_plugins() -> None:
    """Import every module that registers models or tasks (idempotent)."""
    for module in _PLUGIN_MODULES:
        importlib.import_module(module)
