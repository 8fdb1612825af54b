"""Fixed costs of a command (docs/training.md, "Fixed costs of a short run"): what a command imports, and
the allocator setting every `harness` process makes. Checked by what is imported, never by timing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.api.memory import keep_freed_memory


def _imported_after(code: str) -> set[str]:
    """Module names a fresh interpreter holds after running `code`."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_a_model_lookup_imports_the_models_but_not_the_tasks():
    modules = _imported_after("from harness.api import MODELS; MODELS.get('gpt2-scratch')")
    assert "harness.models.gpt2" in modules
    assert "tasks.catalog" not in modules and "tasks.ppl" not in modules


def test_a_task_lookup_imports_the_tasks():
    modules = _imported_after("from harness.api import TASKS; TASKS.get('ppl')")
    assert "tasks.ppl" in modules


def test_listing_every_kind_still_loads_every_plugin():
    modules = _imported_after("from harness.api import load_plugins; load_plugins()")
    assert {"harness.models.gpt2", "tasks.catalog", "harness.train.report"} <= modules


@pytest.mark.parametrize(("argv", "absent"), [
    (["train", "--help"], {"harness.diagnose", "harness.lm_eval_cmd", "torch"}),
    (["generate", "--help"], {"harness.diagnose", "harness.train.command"}),
    (["list", "tasks"], {"harness.diagnose", "harness.train.command", "harness.generate"}),
])
def test_the_parser_imports_only_the_command_it_runs(argv, absent):
    code = f"from harness.cli import build_parser; build_parser({argv!r})"
    assert not (absent & _imported_after(code))


def test_help_still_lists_every_command():
    from harness.cli import build_parser

    text = build_parser(["--help"]).format_help()
    for command in ("run", "list", "report", "gate", "train", "generate", "diagnose", "lm-eval"):
        assert command in text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_on_glibc_and_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("HARNESS_MALLOC", "system")
    assert keep_freed_memory() is False
    monkeypatch.delenv("HARNESS_MALLOC")
    assert keep_freed_memory() is True
