"""What `harness list models|tasks` shows, and a cache of it so that listing imports no plugin.

A model: its default weights (and aliases), the capabilities its adapter declares, its reference (for a
scratch model) or the scratch model held to it, and its description. A task: its version, the
capabilities it needs, every config key with its type and default (the `--set TASK.KEY=VALUE` keys),
and its metrics (direction, tolerance, which one is the scorecard's headline).

Importing the plugins that define these (every adapter, task and reproduction, transformers and torch)
takes seconds; the listing itself is a few kilobytes. So the first `harness list` after any change loads
them and writes the listing to `<cache>/listing-<fingerprint>.json` (`$HARNESS_CACHE`, else
~/.cache/lm-repro-harness, outside the repository), and `harness list` reads it back without importing
a plugin. The fingerprint covers the path, size and modification time of every source file of the
built-in plugin packages and of the files named in `HARNESS_PLUGINS`, the Python and harness versions, and
the installed packages' entry points of the plugin groups: any edit or install builds a new listing. A
plugin named by module in `HARNESS_PLUGINS` is located by `importlib.util.find_spec` (which may import
its parent package).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
import platform
import typing
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.api.registry import BUILTIN_PLUGINS, ENTRY_POINT_GROUPS, MODELS, TASKS, load_plugins

LISTING_VERSION = 1


def cache_dir() -> Path:
    """$HARNESS_CACHE, else ~/.cache/lm-repro-harness (the converted checkpoints' cache too)."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "lm-repro-harness")


# ---- describing what the registries hold (needs the plugins loaded) -----------------------------------


def describe_models() -> list[dict[str, Any]]:
    load_plugins()
    scratch_of = {entry.obj.info.reference: entry.name for entry in MODELS if entry.obj.info.reference}
    rows = []
    for entry in MODELS:
        spec = entry.obj
        arch = spec.arch
        rows.append({
            "name": entry.name,
            "default_weights": getattr(arch, "default_weights", "") or "",
            "aliases": sorted(set(getattr(arch, "aliases", {}) or {}) - {getattr(arch, "default_weights", "")}),
            "capabilities": sorted(c.value for c in model_capabilities(spec)),
            "reference": spec.info.reference or "",
            "scratch": scratch_of.get(entry.name, ""),
            "description": entry.description,
        })
    for name, target in sorted(getattr(MODELS, "factories", {}).items()):  # entry-point factories (user models)
        rows.append({"name": name, "default_weights": "", "aliases": [], "capabilities": [], "reference": "",
                     "scratch": "", "description": f"entry-point factory {target} (run with --reference REF)"})
    return rows


def model_capabilities(spec: Any) -> frozenset:
    """What the model's adapter declares: `spec.capabilities` when the spec carries them, else the
    `capabilities` of the adapter class its factory builds (found in the factory's names; an adapter that
    narrows them per checkpoint at build time, e.g. GPT-1 without an `lm_head` dropping classify, shows
    its class's)."""
    declared = getattr(spec, "capabilities", None)
    if declared:
        return frozenset(declared)
    from harness.api.adapter import ModelAdapter

    for cls in _referenced_classes(spec.factory):
        if isinstance(cls, type) and issubclass(cls, ModelAdapter):
            return frozenset(cls.capabilities)
    return frozenset()


def _referenced_classes(func: Any, depth: int = 0) -> list[Any]:
    """Objects a function names (globals, closure cells), and the return annotations of functions it calls."""
    code = getattr(func, "__code__", None)
    if code is None or depth > 2:
        return []
    scope = dict(getattr(func, "__globals__", {}))
    for name, cell in zip(code.co_freevars, func.__closure__ or ()):
        try:
            scope[name] = cell.cell_contents
        except ValueError:
            continue
    found = []
    for name in code.co_names + code.co_freevars:
        obj = scope.get(name)
        if isinstance(obj, type):
            found.append(obj)
        elif inspect.isfunction(obj):
            annotation = obj.__annotations__.get("return")
            target = obj.__globals__.get(annotation) if isinstance(annotation, str) else annotation
            found += [target] if isinstance(target, type) else _referenced_classes(obj, depth + 1)
    return found


def describe_tasks() -> list[dict[str, Any]]:
    from harness.api.kinds import headline_metric

    load_plugins()
    rows = []
    for entry in TASKS:
        cls = entry.obj
        rows.append({
            "name": entry.name,
            "version": str(getattr(cls, "version", "")),
            "needs": sorted(c.value for c in getattr(cls, "needs", ())),
            "config": config_keys(getattr(cls, "config_class", None)),
            "metrics": [_metric(name, spec) for name, spec in getattr(cls, "metrics", {}).items()],
            "headline": headline_metric(entry.name, cls) or "",
            "description": entry.description,
        })
    return rows


def config_keys(config_class: type | None) -> list[dict[str, str]]:
    """Every field of a task's config: name, type (as written) and default."""
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return []
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation that cannot be resolved: show it as written
        hints = {}
    keys = []
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        keys.append({"key": f.name, "type": _type_name(hints.get(f.name, f.type)), "default": _show(default)})
    return keys


def _type_name(typ: Any) -> str:
    if isinstance(typ, str):
        return typ
    if isinstance(typ, type) and not typing.get_args(typ):
        return typ.__name__
    return str(typ).replace("typing.", "")


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "(empty)"
    return "None" if value is None else str(value)


def _metric(name: str, spec: Any) -> dict[str, Any]:
    from harness.api.kinds import metric_kind, pair_rule

    direction = {True: "higher", False: "lower", None: "-"}[getattr(spec, "higher_is_better", None)]
    return {"name": name, "better": direction, "kind": metric_kind(name, spec), "pair_tolerance": pair_rule(name, spec)}


# ---- the cache ------------------------------------------------------------------------------------


def fingerprint() -> str:
    """A hash of everything the listing depends on (see the module docstring); cheap: stat calls only."""
    from harness import __version__

    h = hashlib.sha256(f"{LISTING_VERSION}|{platform.python_version()}|{__version__}".encode())
    for path in sorted(_source_files()):
        try:
            st = path.stat()
        except OSError:
            continue
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(os.environ.get("HARNESS_PLUGINS", "").encode())
    for group in ENTRY_POINT_GROUPS:
        for ep in metadata.entry_points(group=group):
            h.update(f"{group}|{ep.name}|{ep.value}|{getattr(ep.dist, 'version', '')}\n".encode())
    return h.hexdigest()[:20]


def _source_files() -> list[Path]:
    roots = {Path(__file__).resolve().parent.parent}  # the harness package (its api and models)
    for module in BUILTIN_PLUGINS + ("reproductions",):
        top = module.split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is not None:
            roots.update(Path(loc) for loc in spec.submodule_search_locations or [])
    files = [f for root in roots for f in root.rglob("*.py")]
    for plugin in filter(None, (m.strip() for m in os.environ.get("HARNESS_PLUGINS", "").split(","))):
        if plugin.endswith(".py"):
            files.append(Path(plugin).resolve())
        else:
            try:
                spec = importlib.util.find_spec(plugin)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.origin:
                files.append(Path(spec.origin))
    return files


def listing(kind: str) -> list[dict[str, Any]]:
    """`describe_models()` or `describe_tasks()` (kind "models" / "tasks"), from the cache when it is current."""
    path = cache_dir() / f"listing-{fingerprint()}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))[kind]
    except (OSError, ValueError, KeyError):
        pass
    data = {"models": describe_models(), "tasks": describe_tasks()}
    write_listing(path, data)
    return data[kind]


def write_listing(path: Path | None = None, data: dict | None = None) -> Path | None:
    """Write the listing (atomically; a cache that cannot be written is skipped silently)."""
    path = path or cache_dir() / f"listing-{fingerprint()}.json"
    data = data or {"models": describe_models(), "tasks": describe_tasks()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        return None
    return path
