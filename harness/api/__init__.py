"""The harness's public API: everything a task, a model adapter or a command builds on.

    from harness.api import TASKS, Task, MetricSpec, RunContext, Scorer, HarnessError

Layers (docs/architecture.md): `harness.api` imports no task, no concrete adapter and no
reproduction; tasks (`tasks/`) and adapters (`harness/models/`) import it and are found by the
registry's plugin loader; the commands (`harness run`, `report`, `gate`, `train`, ...) sit on top.
Names are imported lazily, so `import harness.api` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "harness.api.errors": ("HarnessError", "UnknownNameError"),
    "harness.api.registry": ("MODELS", "TASKS", "REPORT_SECTIONS", "Registry", "load_plugins"),
    "harness.api.capabilities": (
        "Capability", "Scorer", "Logits", "Encoder", "Generator", "Classifier", "Trainable", "CausalLM", "Seq2Seq",
        "Tokenize", "Ladder", "Fitter",
    ),
    "harness.api.adapter": ("ModelAdapter", "ModelInfo", "ModelSpec", "check_device"),
    "harness.api.task": ("Task", "RunContext", "MetricSpec", "make_config", "metric_spec"),
    "harness.api.config": ("coerce", "coerce_config", "config_fields", "parse_overrides"),
    "harness.api.rows": ("SCHEMA_VERSION", "Metric", "ResultRow", "make_row", "new_run_id", "now_iso", "provenance"),
    "harness.api.store": ("ResultStore", "load_results", "latest", "read_jsonl", "result_files", "RunJournal",
                          "DEFAULT_RESULTS_DIR", "DEFAULT_REPORT"),
    "harness.api.tolerance": ("allowed_difference", "noise_slack"),
    "harness.api.weights": ("ArchSpec", "Weights", "load_weights", "tensor_sha256"),
    "harness.api.tokenizer": ("TextTokenizer",),
    "harness.api.training": ("Recipe", "torch_threads", "pad_right"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'harness.api' has no attribute '{name}'")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
