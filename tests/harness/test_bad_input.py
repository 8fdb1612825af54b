"""Every failure of input (issue 14): one line naming the problem and its fix, exit code 2, nothing else
printed and nothing written, found before any weights load wherever the model is not needed."""

import dataclasses
from pathlib import Path

import pytest
import torch

from harness.api import MODELS
from harness.api.registry import Entry
from harness.cli import main

RUN = ["run", "--model", "gpt2-scratch", "--tasks", "ppl", "--weights", "random:tiny"]
GENERATE = ["generate", "--model", "gpt2-scratch", "--weights", "random:tiny", "--prompt", "hi"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A working directory with a `runs/` folder, a text file, an empty one, a binary one and a plain file."""
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "empty.txt").write_text(" \n")
    (work / "binary.dat").write_bytes(b"\xff\xfe\x00\x81binary")
    (work / "plain-file").write_text("not a directory")
    monkeypatch.chdir(work)
    return work


def _no_loading(monkeypatch):
    """Fail the test if any weights are loaded: these inputs must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr("harness.runner.load_weights", refuse)


RUN_CASES = {
    "limit-zero": (["--limit", "0"], ["--limit 0", "at least 1"]),
    "limit-negative": (["--limit", "-3"], ["--limit -3", "at least 1"]),
    "seed-negative": (["--seed", "-1"], ["--seed -1", ">= 0"]),
    "device-gpu": (["--device", "gpu"], ["--device 'gpu'", "cpu, cuda or cuda:N"]),
    "device-mps": (["--device", "mps"], ["--device 'mps'", "cpu, cuda or cuda:N"]),
    "device-cuda-bad-index": (["--device", "cuda:x"], ["--device 'cuda:x'", "cuda:N"]),
    "device-cpu-index": (["--device", "cpu:0"], ["--device 'cpu:0'", "cpu, cuda or cuda:N"]),
    "models-empty": (["--model", ","], ["--model", "at least one model"]),
    "tasks-empty": (["--tasks", ","], ["--tasks", "at least one task"]),
    "set-task-not-in-tasks": (["--set", "glue.lrr=1"], ["--set glue.lrr", "task 'glue' is not in --tasks ppl"]),
    "set-unknown-task": (["--set", "nosuch.x=1"], ["unknown task 'nosuch'"]),
    "set-unknown-key": (["--set", "ppl.strid=1"], ["unknown key 'ppl.strid'", "ppl.stride"]),
    "ppl-stride-zero": (["--set", "ppl.stride=0"], ["ppl.stride=0", "between 1 and ppl.max_length"]),
    "ppl-stride-over-max-length": (["--set", "ppl.stride=9", "--set", "ppl.max_length=8"],
                                   ["ppl.stride=9", "ppl.max_length=8"]),
    "ppl-max-length-zero": (["--set", "ppl.max_length=0"], ["ppl.max_length=0", "positive"]),
    "ppl-batch-size-zero": (["--set", "ppl.batch_size=0"], ["ppl.batch_size=0", "at least 1"]),
    "ppl-prefix-negative": (["--set", "ppl.prefix_token_id=-1"], ["ppl.prefix_token_id=-1", ">= 0"]),
    "ppl-file-missing": (["--set", "ppl.file=no-such.txt"], ["ppl.file", "'no-such.txt' not found"]),
    "ppl-file-empty": (["--set", "ppl.file=empty.txt"], ["ppl.file 'empty.txt'", "empty"]),
    "ppl-file-binary": (["--set", "ppl.file=binary.dat"], ["ppl.file", "'binary.dat'", "UTF-8"]),
    "ppl-file-directory": (["--set", "ppl.file=runs"], ["ppl.file 'runs'", "is a directory"]),
    "weights-typo-under-local-dir": (["--weights", "runs/shakespear"], ["'runs/shakespear'", "no such directory"]),
    "weights-dot-relative": (["--weights", "./x"], ["'./x'", "no such directory"]),
    "weights-parent-relative": (["--weights", "../x"], ["'../x'", "no such directory"]),
    "weights-home": (["--weights", "~/no-such-checkpoint-b14"], ["'~/no-such-checkpoint-b14'", "no such directory"]),
    "weights-absolute": (["--weights", "/no/such/checkpoint"], ["'/no/such/checkpoint'", "no such directory"]),
    "weights-deep-path": (["--weights", "a/b/c"], ["'a/b/c'", "no such directory"]),
    "weights-is-a-file": (["--weights", "plain-file"], ["'plain-file'", "a file, not a checkpoint directory"]),
    "weights-not-a-spec": (["--weights", "not-a-hub-id"], ["'not-a-hub-id'", "hub id (owner/name)"]),
    "weights-unknown-random-size": (["--weights", "random:nosuchsize"], ["size 'nosuchsize'", "known sizes"]),
    "results-dir-is-a-file": (["--results-dir", "plain-file"], ["cannot create results dir", "plain-file"]),
}


def _one_line_exit_2(capsys, argv, words):
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert out == "", out  # no results table, no "0 rows -> ..."
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize("extra, words", list(RUN_CASES.values()), ids=list(RUN_CASES))
def test_bad_run_input_is_one_line_exit_2_nothing_written(extra, words, files, capsys, monkeypatch, request):
    if not request.node.callspec.id.startswith("weights"):  # --weights are checked by load_weights itself
        _no_loading(monkeypatch)
    argv = [*RUN, "--results-dir", str(files / "results"), *extra]
    _one_line_exit_2(capsys, argv, words)
    assert list(files.rglob("*.jsonl")) == []


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_cuda_device(device, files, capsys, monkeypatch):
    _no_loading(monkeypatch)
    _one_line_exit_2(capsys, [*RUN, "--results-dir", str(files / "results"), "--device", device],
                     [f"--device {device}", "no CUDA device", "--device cpu"])
    assert list(files.rglob("*.jsonl")) == []


def test_a_hub_id_stays_a_hub_id(files, capsys, monkeypatch):
    """`owner/name` whose owner is no local folder goes to the hub (here: the offline cache, which lacks it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _one_line_exit_2(capsys, [*RUN, "--results-dir", str(files / "results"), "--weights", "nobody-b14/none"],
                            ["'nobody-b14/none'", "local Hugging Face cache"])
    assert "no such directory" not in line


GENERATE_CASES = {
    "device-gpu": (["--device", "gpu"], ["--device 'gpu'", "cpu, cuda or cuda:N"]),
    "seed-negative": (["--seed", "-1"], ["--seed -1", ">= 0"]),
    "max-new-tokens-zero": (["--max-new-tokens", "0"], ["--max-new-tokens 0", "at least 1"]),
    "weights-typo": (["--weights", "./nope"], ["'./nope'", "no such directory"]),
    "unknown-model": (["--model", "gpt5-scratch"], ["unknown model 'gpt5-scratch'"]),
    "cannot-generate": (["--model", "bert-scratch"], ["'bert-scratch' cannot 'generate'"]),  # after the build
}


@pytest.mark.parametrize("extra, words", list(GENERATE_CASES.values()), ids=list(GENERATE_CASES))
def test_bad_generate_input_is_one_line_exit_2(extra, words, files, capsys):
    _one_line_exit_2(capsys, [*GENERATE, *extra], words)


def test_a_model_that_cannot_take_its_weights_fails_alone(tmp_path, capsys, monkeypatch):
    """Weights that do not fit one model's module: that (model, task) fails in one line, the other model
    runs and writes its rows, and the run exits 1 as for any task failure."""
    spec = MODELS.get("gpt2-scratch")

    def misfit(weights, device):
        raise RuntimeError("Error(s) in loading state_dict for GPT2:\n\tsize mismatch for wte.weight")

    broken = dataclasses.replace(spec, factory=misfit)
    monkeypatch.setitem(MODELS._entries, "gpt2-scratch", Entry("gpt2-scratch", "broken", broken))
    results = tmp_path / "results"
    argv = ["run", "--model", "gpt2-scratch,gpt2-hf", "--tasks", "ppl", "--weights", "random:tiny", "--limit", "1",
            "--results-dir", str(results)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "gpt2-scratch / ppl: gpt2-scratch cannot load weights 'random:tiny': Error(s) in loading" in err
    assert "Traceback" not in err
    rows = [Path(p).read_text().splitlines() for p in results.rglob("*.jsonl")]
    assert len(rows) == 1 and len(rows[0]) == 4 and all('"model": "gpt2-hf"' in r for r in rows[0])


def test_a_run_where_every_task_fails_writes_no_file(tmp_path, capsys):
    """A check that needs the model (max_length against its maximum) fails that (model, task) after the load:
    exit 1, the reason in one line, and no results file, not even an empty one."""
    results = tmp_path / "results"
    assert main([*RUN, "--limit", "1", "--set", "ppl.max_length=100000", "--results-dir", str(results)]) == 1
    err = capsys.readouterr().err
    assert "gpt2-scratch / ppl: ppl.max_length=100000 exceeds gpt2-scratch's maximum" in err and "Traceback" not in err
    assert list(tmp_path.rglob("*.jsonl")) == []
