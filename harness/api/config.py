"""Typed config overrides, one implementation for every command: `--set TASK.KEY=VALUE` on `harness
run`, and `harness train`'s flags and `--set train.KEY=VALUE`.

A config is a frozen dataclass; `coerce_config` coerces each raw string to the field's declared type
(int, float, bool, Literal, tuples, optionals) and names the known keys when one is unknown.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from harness.api.errors import HarnessError, UnknownNameError


def config_fields(config_class: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


def coerce_config(config_class: type, overrides: dict[str, str], prefix: str, base: Any = None) -> Any:
    """`config_class` (or a copy of `base`) with string overrides coerced to their declared types;
    `prefix` names the config in errors (`ppl` -> "unknown key 'ppl.strid'; known keys: ppl.stride, ...")."""
    fields = config_fields(config_class)
    values = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise UnknownNameError(
                f"unknown key '{prefix}.{key}'; known keys: " + ", ".join(f"{prefix}.{k}" for k in fields)
            )
        values[key] = coerce(raw, fields[key], f"{prefix}.{key}")
    return dataclasses.replace(base, **values) if base is not None else config_class(**values)


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
