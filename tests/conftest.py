import os

import pytest

# The test suite never touches the network: transformers/datasets must use local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One small end-to-end run (gpt2 pair, ppl on 2 documents + parity), shared by several tests."""
    from harness.runner import RunPlan, run

    results = tmp_path_factory.mktemp("results")
    plan = RunPlan(
        models=["gpt2-scratch", "gpt2-hf"],
        tasks=["ppl", "parity"],
        weights="random:tiny",
        limit=2,
        seed=0,
        results_dir=str(results),
    )
    store, failures = run(plan)
    assert failures == []
    return store


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: a second thread gains nothing there, and on busy
    shared cores its hand-offs make them many times slower. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    from harness.api import torch_threads

    with torch_threads(1):
        yield
