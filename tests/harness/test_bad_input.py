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


# --- the sweep (issue 14): every --set key's range, local checkpoints, output paths, results files ---

SET_RANGE_CASES = {
    "glue-batch-size-zero": (["--tasks", "glue", "--set", "glue.batch_size=0"], ["glue.batch_size=0", "at least 1"]),
    "glue-lr-negative": (["--tasks", "glue", "--set", "glue.lr=-1"], ["glue.lr=-1", "> 0"]),
    "glue-lr-nan": (["--tasks", "glue", "--set", "glue.lr=nan"], ["glue.lr=nan", "finite"]),
    "glue-epochs-zero": (["--tasks", "glue", "--set", "glue.epochs=0"], ["glue.epochs=0", "at least 1"]),
    "glue-weight-decay-negative": (["--tasks", "glue", "--set", "glue.weight_decay=-1"], ["glue.weight_decay", ">= 0"]),
    "seq2seq-steps-zero": (["--tasks", "seq2seq", "--set", "seq2seq.steps=0"], ["seq2seq.steps=0", "at least 1"]),
    "ngram-rules-samples-negative": (["--tasks", "ngram-rules", "--set", "ngram-rules.samples=-1"],
                                     ["ngram-rules.samples=-1", "at least 1"]),
    "parity-seq-len-zero": (["--tasks", "parity", "--set", "parity.seq_len=0"], ["parity.seq_len=0", "at least 1"]),
    "throughput-batch-sizes-zero": (["--tasks", "throughput", "--set", "throughput.batch_sizes=1,0"],
                                    ["throughput.batch_sizes=1,0", "positive integers"]),
    "char-ppl-val-fraction": (["--tasks", "char-ppl", "--set", "char-ppl.val_fraction=1.5"],
                              ["char-ppl.val_fraction=1.5", "between 0 and 1"]),
    "set-wrong-type": (["--set", "ppl.batch_size=four"], ["ppl.batch_size='four'", "expected int"]),
    "set-no-equals": (["--set", "ppl.stride"], ["--set 'ppl.stride'", "TASK.KEY=VALUE"]),
    "model-twice": (["--model", "gpt2-scratch,gpt2-scratch"], ["'gpt2-scratch' is given 2 times"]),
    "unknown-model": (["--model", "gpt5-scratch"], ["unknown model 'gpt5-scratch'"]),
    "unknown-task": (["--tasks", "ppx"], ["unknown task 'ppx'"]),
}


@pytest.mark.parametrize("extra, words", list(SET_RANGE_CASES.values()), ids=list(SET_RANGE_CASES))
def test_bad_set_values_are_refused_before_weights_load(extra, words, files, capsys, monkeypatch):
    _no_loading(monkeypatch)
    argv = [*RUN, "--results-dir", str(files / "results")]
    for flag in ("--tasks", "--model"):  # these replace RUN's value instead of repeating the flag
        if flag in extra:
            i = extra.index(flag)
            argv[argv.index(flag) + 1] = extra[i + 1]
            extra = extra[:i] + extra[i + 2:]
    _one_line_exit_2(capsys, [*argv, *extra], words)
    assert not (files / "results").exists()


@pytest.fixture
def checkpoints(tmp_path):
    """Broken copies of the shipped default GPT-2 checkpoint (config.json + model.safetensors)."""
    source = Path(__file__).resolve().parents[2] / "harness" / "assets" / "gpt2-default"
    made = {}
    for name in ("truncated", "garbage", "no-config", "bad-config", "no-weights"):
        d = tmp_path / name
        d.mkdir()
        for f in ("config.json", "model.safetensors"):
            (d / f).write_bytes((source / f).read_bytes())
        made[name] = d
    data = (made["truncated"] / "model.safetensors").read_bytes()
    (made["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    (made["garbage"] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (made["no-config"] / "config.json").unlink()
    (made["bad-config"] / "config.json").write_text("{not json")
    (made["no-weights"] / "model.safetensors").unlink()
    return made


CHECKPOINT_CASES = {
    "truncated": ["model.safetensors is truncated", "write the checkpoint again"],
    "garbage": ["model.safetensors is corrupt"],
    "no-config": ["no config.json in the directory", "HF-format checkpoint directory"],
    "bad-config": ["config.json is not valid JSON"],
    "no-weights": ["no weights file (model.safetensors"],
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES), ids=list(CHECKPOINT_CASES))
def test_a_broken_checkpoint_is_one_line(case, checkpoints, tmp_path, capsys, monkeypatch):
    def no_transformers(*args, **kwargs):
        raise AssertionError("transformers read a checkpoint that was not checked first")

    monkeypatch.setattr("harness.api.weights._pretrained_weights", no_transformers)
    argv = ["run", "--model", "gpt2-scratch", "--tasks", "ppl", "--weights", str(checkpoints[case]),
            "--results-dir", str(tmp_path / "results")]
    _one_line_exit_2(capsys, argv, [f"weights '{checkpoints[case]}'", *CHECKPOINT_CASES[case]])
    assert not (tmp_path / "results").exists()


def test_a_good_checkpoint_passes_the_check(checkpoints):
    from harness.api.weights import check_checkpoint_dir

    source = Path(__file__).resolve().parents[2] / "harness" / "assets" / "gpt2-default"
    check_checkpoint_dir(source, "gpt2-default")  # no error


OUTPUT_CASES = {
    "report-out-under-a-file": (["report", "--results-dir", "runs", "--out", "plain-file/report.md"],
                                ["--out 'plain-file/report.md'", "'plain-file' is a file"]),
    "report-out-is-a-directory": (["report", "--results-dir", "runs", "--out", "runs"],
                                  ["--out 'runs' is a directory"]),
    "report-results-missing": (["report", "--results-dir", "no-such-dir"], ["'no-such-dir' does not exist"]),
    "report-results-not-json": (["report", "--results-dir", "bad-rows"], ["x.jsonl:1: not a JSON object"]),
    "gate-baseline-missing": (["gate", "--baseline", "no-such-dir"], ["'no-such-dir' does not exist"]),
    "gate-baseline-not-json": (["gate", "--baseline", "bad-rows"], ["x.jsonl:1: not a JSON object"]),
    "gate-junit-under-a-file": (["gate", "--baseline", "runs", "--junit", "plain-file/g.xml"],
                                ["--junit 'plain-file/g.xml'", "is a file"]),
    "gate-json-under-a-file": (["gate", "--baseline", "runs", "--json", "plain-file/g.json"],
                               ["--json 'plain-file/g.json'", "is a file"]),
    "gate-bad-tol": (["gate", "--baseline", "runs", "--tol", "word_perplexity=xx"], ["--tol 'word_perplexity=xx'"]),
}


@pytest.mark.parametrize("argv, words", list(OUTPUT_CASES.values()), ids=list(OUTPUT_CASES))
def test_bad_report_and_gate_input_is_one_line_exit_2(argv, words, files, capsys):
    (files / "bad-rows" / "v1").mkdir(parents=True)
    (files / "bad-rows" / "v1" / "x.jsonl").write_text('{"model": \n')
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    _one_line_exit_2(capsys, argv, words)
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == before  # nothing written
