"""`harness train --tensorboard DIR`: standard event files whose scalars are the logged losses, the
learning rate and tokens/s; a one-line error when the tensorboard package is missing. Also the
schedule defaults that scale with --steps and the on-disk cache of tokenised corpora."""

from __future__ import annotations

import dataclasses
import io
import sys

import pytest
import torch
from rich.console import Console

from harness.cli import main
from harness.train.checkpoint import STATE_FILE
from harness.train.config import TrainConfig, TrainRun, sized_to_steps
from harness.train.data import cached_ids
from harness.train.loop import lr_at, train

TINY = TrainConfig(
    steps=4, batch_size=2, block_size=16, warmup_steps=1, eval_interval=2, eval_batches=1, log_interval=1
)
CLI = ["train", "--model", "gpt2-scratch", "--data", "tinyshakespeare", "--batch-size", "2", "--block-size", "16"]


pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_files_hold_the_logged_curves(tmp_path):
    pytest.importorskip("tensorboard")
    run = TrainRun(
        model="gpt2-scratch",
        data="tinyshakespeare",
        out=str(tmp_path / "out"),
        size="tiny",
        results_dir=str(tmp_path / "results"),
        tensorboard=str(tmp_path / "tb"),
    )
    result = train(run, TINY, console=Console(file=io.StringIO()))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    got = scalars(tmp_path / "tb")
    assert set(got) == {"train_loss", "lr", "tokens_per_second", "val_loss"}
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # event files store float32
    assert got["train_loss"] == [(s, f32(loss)) for s, loss in enumerate(result.train_losses, start=1)]
    assert got["val_loss"] == [(s, f32(v)) for s, v in sorted(result.val_losses.items())]
    assert got["lr"] == [(s, f32(lr_at(s - 1, TINY))) for s in range(1, 5)]
    assert [s for s, _ in got["tokens_per_second"]] == [1, 2, 3, 4] and all(v > 0 for _, v in got["tokens_per_second"])


def test_missing_tensorboard_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    out, tb = tmp_path / "out", tmp_path / "tb"
    args = [*CLI, "--steps", "2", "--out", str(out), "--results-dir", str(tmp_path / "r"), "--tensorboard", str(tb)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install tensorboard" in err
    assert not out.exists() and not tb.exists() and not (tmp_path / "r").exists()


# -- schedule defaults scaled to --steps -------------------------------------------------------------


def test_defaults_scale_with_steps_unless_given():
    assert sized_to_steps(TrainConfig(steps=100), given=set()).warmup_steps == 10
    assert sized_to_steps(TrainConfig(steps=100), given=set()).eval_batches == 10
    assert sized_to_steps(TrainConfig(steps=10), given=set()).eval_batches == 1
    long = sized_to_steps(TrainConfig(steps=5000), given=set())
    assert (long.warmup_steps, long.eval_batches) == (100, 20)  # a long run keeps the defaults
    explicit = sized_to_steps(TrainConfig(steps=100, warmup_steps=100), given={"warmup_steps"})
    assert explicit.warmup_steps == 100


def test_cli_sizes_the_schedule_and_warns_when_it_is_all_warmup(tmp_path, capsys):
    out, results = tmp_path / "auto", str(tmp_path / "r")
    assert main([*CLI, "--steps", "20", "--out", str(out), "--results-dir", results, "--set", "model.n_layer=1"]) == 0
    saved = torch.load(out / STATE_FILE, weights_only=True)["config"]
    assert (saved["warmup_steps"], saved["eval_batches"]) == (2, 2)
    assert "warning" not in capsys.readouterr().err
    args = [*CLI, "--steps", "2", "--warmup-steps", "2", "--out", str(tmp_path / "w"), "--results-dir", results]
    assert main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "warmup_steps=2 >= steps=2" in warnings[0]


def test_help_states_the_scaled_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default min(100, steps // 10))" in text and "(default min(20, max(1, steps // 10)))" in text
    assert "--tensorboard DIR" in text and "torchrun" in text


# -- the tokenised-corpus cache ----------------------------------------------------------------------


def test_tokenised_text_is_cached_by_tokenizer_and_text(tmp_path, monkeypatch):
    from harness.api.tokenizer import gpt2_tokenizer

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    tok, calls = gpt2_tokenizer(), []

    def encode(text):
        calls.append(text)
        return tok.encode(text)

    first = cached_ids("Hello world", tok, lambda: encode("Hello world"))
    again = cached_ids("Hello world", tok, lambda: encode("Hello world"))
    other = cached_ids("Hello there", tok, lambda: encode("Hello there"))
    assert first == again == [15496, 995] and other == tok.encode("Hello there")
    assert calls == ["Hello world", "Hello there"]  # the second call read the cache
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 2
    for f in (tmp_path / "tokens").glob("*.pt"):
        f.write_bytes(b"damaged")
    assert cached_ids("Hello world", tok, lambda: encode("Hello world")) == [15496, 995]  # recomputed
    assert len(calls) == 3


def test_tiny_config_is_unchanged_by_sizing():
    cfg = dataclasses.replace(TINY)
    assert sized_to_steps(cfg, given={"warmup_steps", "eval_batches"}) == cfg
