"""`harness train` under torchrun: 2 CPU ranks (gloo) train on the same sequences as one process and
end at the same losses (<= 1e-5), rank 0 alone writes rows and the checkpoint, and a checkpoint of
2 ranks resumes on 1.

One torchrun launch (2 processes, a 1-layer tiny GPT-2, 4 steps of 4 x 16 tokens with grad_accum 2)
is shared by the tests; the single-process runs are in-process. GLOO_SOCKET_IFNAME=lo keeps gloo on
the loopback interface; torchrun sets OMP_NUM_THREADS=1, and the single process runs with 1 thread too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from harness.api import HarnessError, load_results
from harness.cli import main
from harness.train.checkpoint import STATE_FILE
from harness.train.distributed import World

ATOL = 1e-5  # per-step train loss, val loss and final metrics: 2 ranks vs 1 process (float reduction order)
ARGS = [
    "train",
    "--model",
    "gpt2-scratch",
    "--data",
    "tinyshakespeare",
    "--steps",
    "4",
    "--batch-size",
    "4",
    "--block-size",
    "16",
    "--grad-accum",
    "2",
    "--set",
    "model.n_layer=1",
    "--log-interval",
    "1",
    "--eval-interval",
    "2",
    "--eval-batches",
    "2",
]


def state(out) -> dict:
    return torch.load(out / STATE_FILE, weights_only=True)


def rows(results) -> dict[tuple[str, int], float]:
    df = load_results(results)
    return {(m, e["step"]): v for m, e, v in zip(df["metric"], df["extra"], df["value"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same command on 2 torchrun ranks and in 1 process."""
    tmp = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "harness"]
    two = subprocess.run(
        [*cmd, *ARGS, "--out", str(tmp / "two"), "--results-dir", str(tmp / "r2")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*ARGS, "--out", str(tmp / "one"), "--results-dir", str(tmp / "r1")]) == 0
    finally:
        torch.set_num_threads(before)
    return tmp, two


def test_two_ranks_train_like_one_process(runs):
    tmp, two = runs
    a, b = state(tmp / "two"), state(tmp / "one")
    assert len(a["train_losses"]) == 4
    torch.testing.assert_close(torch.tensor(a["train_losses"]), torch.tensor(b["train_losses"]), atol=ATOL, rtol=0)
    assert a["val_losses"].keys() == b["val_losses"].keys() == {0, 2, 4}
    for step in a["val_losses"]:
        assert a["val_losses"][step] == pytest.approx(b["val_losses"][step], abs=ATOL)
    final_two, final_one = rows(tmp / "r2"), rows(tmp / "r1")
    assert final_two.keys() == final_one.keys()  # rank 0 alone wrote rows: no duplicates, none missing
    for key in ("val_loss", 4), ("train_loss", 4), ("val_perplexity", 4):
        assert final_two[key] == pytest.approx(final_one[key], abs=ATOL * final_one[key])
    assert len(list((tmp / "r2" / "v1").glob("*.jsonl"))) == 1
    logged = " ".join(two.stderr.split())  # off a terminal rich wraps lines
    assert logged.count("step 0: val loss") == 1  # rank 0 alone logs
    assert "2 ranks, each 2 of every batch's 4 sequences" in logged
    assert "Warning" not in logged
    extra = load_results(tmp / "r2")["extra"].iloc[0]
    assert extra["world_size"] == 2
    assert len(a["torch_rng_ranks"]) == 2 and "torch_rng_ranks" not in b


def test_a_checkpoint_of_two_ranks_resumes_on_one(runs, tmp_path):
    """2 ranks then 1 process ends where 1 process then 1 process does: the checkpoint knows no world size."""
    tmp, _ = runs
    for name in ("two", "one"):
        shutil.copytree(tmp / name, tmp_path / name)
    torch.set_num_threads(1)
    for name in ("two", "one"):
        resume = ["train", "--out", str(tmp_path / name), "--resume", "--steps", "6"]
        assert main([*resume, "--results-dir", str(tmp_path / f"r-{name}")]) == 0
    a, b = state(tmp_path / "two"), state(tmp_path / "one")
    assert a["step"] == b["step"] == 6
    torch.testing.assert_close(torch.tensor(a["train_losses"]), torch.tensor(b["train_losses"]), atol=ATOL, rtol=0)
    assert a["val_losses"][6] == pytest.approx(b["val_losses"][6], abs=ATOL)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["n_layer"] == 1


def test_a_batch_that_does_not_divide_among_the_ranks_is_refused():
    World(rank=0, size=2).check_batch(4)
    with pytest.raises(HarnessError, match=r"--batch-size 3 is the global batch .* 2 ranks; .*--batch-size 4"):
        World(rank=1, size=2).check_batch(3)
    assert World(rank=1, size=2).rows(8) == slice(4, 8)
