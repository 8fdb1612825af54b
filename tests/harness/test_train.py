"""`harness train`: schedule, batches, scratch-vs-HF training parity, exact resume, NaN stop, checkpoints.

Every run here is a tiny GPT-2 (2 layers, n_embd 32, GPT-2's 50,257-token vocabulary) on short
windows of Tiny Shakespeare, fp32 on CPU, so a step takes a few milliseconds of real work.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math

import pytest
import torch
import transformers
from rich.console import Console
from safetensors.torch import load_file

from harness.api import HarnessError, load_results
from harness.api.tokenizer import gpt2_tokenizer
from harness.cli import main
from harness.train.checkpoint import STATE_FILE, hf_state
from harness.train.config import TrainConfig, TrainRun, make_train_config, split_overrides
from harness.train.data import load_data, sample_batch
from harness.train.loop import lr_at, train
from harness.train.report import train_report_section

PARITY_ATOL = 1e-4  # per-step |loss_scratch - loss_hf| allowed over 50 steps (measured: 1.9e-6)
TINY = TrainConfig(
    steps=6,
    batch_size=2,
    block_size=16,
    warmup_steps=2,
    lr=3e-3,
    min_lr=3e-4,
    eval_interval=3,
    eval_batches=1,
    log_interval=1,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread: also makes CPU reductions run in one fixed order


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def tiny_run(tmp_path, name: str, model: str = "gpt2-scratch", **kwargs) -> TrainRun:
    return TrainRun(
        model=model,
        data="tinyshakespeare",
        out=str(tmp_path / name),
        size="tiny",
        results_dir=str(tmp_path / "results"),
        **kwargs,
    )


# -- pieces -----------------------------------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way through the cosine
    assert lr_at(99, cfg) == pytest.approx(1e-4, abs=1e-6)
    assert lr_at(500, cfg) == pytest.approx(1e-4)


def test_batches_are_seeded_windows_with_shifted_targets():
    ids = torch.arange(1000)
    x1, y1 = sample_batch(ids, 4, 8, torch.Generator().manual_seed(3))
    x2, _ = sample_batch(ids, 4, 8, torch.Generator().manual_seed(3))
    assert x1.shape == (4, 8) and torch.equal(x1, x2)
    assert torch.equal(y1, x1 + 1)


def test_text_file_is_split_90_10_by_position(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("one two three four five six seven eight nine ten " * 20, encoding="utf-8")
    data = load_data(str(path), gpt2_tokenizer())
    ids = gpt2_tokenizer().encode(path.read_text(encoding="utf-8"))
    assert data.train.tolist() + data.val.tolist() == ids
    assert len(data.train) == int(0.9 * len(ids))


@pytest.mark.slow
def test_wikitext2_trains_on_valid_and_validates_on_test():
    data = load_data("wikitext2", gpt2_tokenizer())
    eot = gpt2_tokenizer().eot_id
    assert (data.train == eot).sum() == 60 and (data.val == eot).sum() == 62  # one per article
    assert 200_000 < len(data.train) < len(data.val) < 320_000


def test_unknown_data_and_keys_fail_in_one_line(tmp_path):
    with pytest.raises(HarnessError, match="not tinyshakespeare, wikitext2"):
        load_data(str(tmp_path / "missing.txt"), gpt2_tokenizer())
    with pytest.raises(HarnessError, match="known keys: train.steps"):
        make_train_config(TrainConfig(), {"stepz": "3"})
    with pytest.raises(HarnessError, match="train.KEY=VALUE"):
        split_overrides(["lr=3"])
    assert make_train_config(TrainConfig(), {"betas": "0.8,0.9", "lr": "2e-3"}).betas == (0.8, 0.9)
    with pytest.raises(HarnessError, match="train.batch_size=0"):
        TrainConfig(batch_size=0)


# -- training ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    """gpt2-scratch and gpt2-hf, 50 steps each from one init on the same batches, dropout 0."""
    tmp_path = tmp_path_factory.mktemp("parity")
    cfg = dataclasses.replace(TINY, steps=50, warmup_steps=5, eval_interval=25, dropout=0.0)
    ours = train(tiny_run(tmp_path, "scratch"), cfg, console=quiet())
    ref = train(tiny_run(tmp_path, "hf", model="gpt2-hf"), cfg, console=quiet())
    return ours, ref, tmp_path


def test_scratch_and_hf_train_identically_from_the_same_init(parity_runs):
    ours, ref, tmp_path = parity_runs
    assert len(ours.train_losses) == len(ref.train_losses) == 50
    torch.testing.assert_close(
        torch.tensor(ours.train_losses), torch.tensor(ref.train_losses), atol=PARITY_ATOL, rtol=0
    )
    assert ours.train_losses[-1] < ours.train_losses[0] - 0.5  # it learned something
    rows = load_results(tmp_path / "results")
    assert rows.groupby("model")["weights_sha256"].first().nunique() == 1  # one shared init
    curve = rows[(rows["metric"] == "train_loss")]
    assert curve.groupby("model").size().to_dict() == {"gpt2-hf": 50, "gpt2-scratch": 50}


def test_rows_carry_steps_and_final_metrics(parity_runs):
    ours, _, tmp_path = parity_runs
    rows = load_results(tmp_path / "results")
    rows = rows[rows["model"] == "gpt2-scratch"]
    assert set(rows["task"]) == {"train"} and set(rows["subtask"]) == {"tinyshakespeare"}
    val = rows[rows["metric"] == "val_loss"]
    assert [e["step"] for e in val["extra"]] == [0, 25, 50]
    final = rows.set_index("metric")
    assert final.loc["val_perplexity", "value"] == pytest.approx(math.exp(ours.val_losses[50]))
    assert final.loc["tokens_per_second", "value"] > 0
    assert rows["config"].iloc[0]["train"]["block_size"] == 16 and rows["git_sha"].iloc[0]


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    cfg = dataclasses.replace(TINY, dropout=0.1, grad_accum=2)  # dropout: the torch RNG must resume too
    whole = train(tiny_run(tmp_path, "whole"), cfg, console=quiet())

    def interrupt(step, _adapter):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(tmp_path, "halves"), cfg, console=quiet(), callback=interrupt)
    assert torch.load(tmp_path / "halves" / STATE_FILE, weights_only=True)["step"] == 3
    resumed = train(tiny_run(tmp_path, "halves"), cfg, console=quiet(), resume=True)
    assert resumed.train_losses == whole.train_losses
    assert resumed.val_losses == whole.val_losses
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "halves" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def poison(step, adapter):
        if step == 4:
            with torch.no_grad():
                next(adapter.module.parameters()).fill_(float("nan"))

    cfg = dataclasses.replace(TINY, eval_interval=2)
    with pytest.raises(HarnessError, match="at step 5; stopped, the last good checkpoint \\(step 4\\)"):
        train(tiny_run(tmp_path, "nan"), cfg, console=quiet(), callback=poison)
    assert torch.load(tmp_path / "nan" / STATE_FILE, weights_only=True)["step"] == 4
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "nan" / "model.safetensors").values())


def test_a_huge_learning_rate_is_caught(tmp_path):
    cfg = dataclasses.replace(TINY, lr=1e6, min_lr=1e6, warmup_steps=1, eval_interval=100)
    with pytest.raises(HarnessError, match=r"loss became (nan|inf) at step \d+"):
        train(tiny_run(tmp_path, "boom", model="gpt2-hf"), cfg, console=quiet())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_checkpoint_loads_unchanged_in_transformers(tmp_path, dtype):
    cfg = dataclasses.replace(TINY, steps=2, save_dtype=dtype)
    trainer_out = tmp_path / "ckpt"
    train(tiny_run(tmp_path, "ckpt"), cfg, console=quiet())
    model = transformers.GPT2LMHeadModel.from_pretrained(trainer_out)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # config.json says float32: upcast
    stored = load_file(trainer_out / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {getattr(torch, dtype)}
    state = torch.load(trainer_out / STATE_FILE, weights_only=True)
    assert ("model_fp32" in state) == (dtype != "float32")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], stored[k].float()) for k in stored)
    assert json.loads((trainer_out / "config.json").read_text())["n_positions"] == 16


def test_hf_state_is_the_reference_layout(tmp_path):
    from harness.train.model import build_model

    adapter = build_model(tiny_run(tmp_path, "x"), TINY)
    state = hf_state(adapter)
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D (in, out)


# -- command line -----------------------------------------------------------------------------------


def test_cli_trains_refuses_to_overwrite_and_resumes_longer(tmp_path, capsys):
    out, results = str(tmp_path / "cli"), str(tmp_path / "results")
    args = [
        "train",
        "--model",
        "gpt2-scratch",
        "--data",
        "tinyshakespeare",
        "--out",
        out,
        "--results-dir",
        results,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--block-size",
        "16",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "train.eval_batches=1",
        "--set",
        "model.n_layer=1",
    ]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a training checkpoint" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume", "--steps", "3", "--results-dir", results]) == 0
    state = torch.load(tmp_path / "cli" / STATE_FILE, weights_only=True)
    assert state["step"] == 3 and len(state["train_losses"]) == 3
    assert transformers.GPT2Config.from_pretrained(out).n_layer == 1
    assert main(["train", "--out", out, "--resume", "--data", "wikitext2"]) == 2
    assert "differs from the checkpoint" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    base = ["train", "--model", "gpt2-scratch", "--data", "tinyshakespeare", "--out", str(tmp_path / "e")]
    assert main([*base, "--set", "model.n_embed=64"]) == 2
    assert "known keys: model.n_layer" in capsys.readouterr().err
    assert main([*base, "--weights", "random:tiny", "--block-size", "128"]) == 2
    assert "exceeds gpt2-scratch's context of 64" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no train_state.pt" in capsys.readouterr().err


def test_report_section_plots_the_curves(parity_runs):
    tmp_path = parity_runs[2]
    report = tmp_path / "report"
    md = train_report_section(load_results(tmp_path / "results"), report / "figures", report)
    assert "![training curves](figures/train_curves.png)" in md
    assert (tmp_path / "report" / "figures" / "train_curves.png").stat().st_size > 0
    assert "| gpt2-scratch |" in md and "Training parity" in md
