"""`--weights owner/name` through the real Hugging Face hub code path, offline, from a local cache.

A tiny seeded GPT-2 is laid out in a temporary hub cache exactly as `huggingface_hub` stores a
download (see `huggingface_hub.file_download`: `repo_folder_name`, `_create_symlink`,
`_cache_commit_hash_for_specific_revision`):

    <HF_HUB_CACHE>/models--openai-community--gpt2/
        blobs/<etag>                          file contents; etag = git blob sha1 (regular files)
                                              or sha256 of the contents (LFS files: weights)
        refs/main                             the commit hash, no trailing newline
        snapshots/<commit>/<file> -> ../../blobs/<etag>   relative symlinks

and the real CLI (`python -m harness run ...`) is run in a subprocess with `HF_HUB_OFFLINE=1`,
so transformers resolves the hub id through `huggingface_hub`'s cache lookup, not a local path.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from harness.api import load_weights, tensor_sha256
from harness.api.store import read_jsonl
from harness.models.gpt2 import ARCH

REPO_ROOT = Path(__file__).resolve().parents[2]
HUB_ID = "openai-community/gpt2"
COMMIT = "607a30d783dfa663caf39e06633721c8d4cfcd7e"  # any 40-hex commit hash; this is gpt2's at one time
LFS_FILES = {"model.safetensors"}  # stored through git LFS on the hub: etag is the sha256 of the contents
EOT = 50256  # GPT-2's <|endoftext|>


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    """A seeded 2-layer GPT-2 with GPT-2's real vocabulary, so the harness's BPE tokenizer fits it."""
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257,
                                     bos_token_id=EOT, eos_token_id=EOT)
    torch.manual_seed(1234)
    return transformers.GPT2LMHeadModel(config).eval()


def _etag(name: str, data: bytes) -> str:
    if name in LFS_FILES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob object id


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Store `files` as one commit of `repo_id` in a hub cache; returns the snapshot directory."""
    repo = cache / "--".join(["models", *repo_id.split("/")])
    snapshot = repo / "snapshots" / commit
    for sub in (repo / "blobs", repo / "refs", snapshot):
        sub.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        etag = _etag(name, data)
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / name
        link.symlink_to(os.path.relpath(repo / "blobs" / etag, link.parent))
    return snapshot


@pytest.fixture(scope="module")
def populated_cache(tmp_path_factory):
    """(HF_HOME, snapshot dir, tensor hash of the tiny model) for a cache that holds HUB_ID."""
    model = tiny_gpt2()
    staged = tmp_path_factory.mktemp("save_pretrained")
    model.save_pretrained(staged)
    files = {p.name: p.read_bytes() for p in sorted(staged.iterdir()) if p.is_file()}
    assert {"config.json", "model.safetensors"} <= files.keys()
    home = tmp_path_factory.mktemp("hf_home")
    snapshot = write_hub_cache(home / "hub", HUB_ID, files)
    return home, snapshot, tensor_sha256(model.state_dict())


def offline_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HF_HOME")}
    env.update(HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_cli(home: Path, results: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "harness", "run", "--model", "gpt2-scratch,gpt2-hf", "--weights", HUB_ID,
           "--tasks", "parity,ppl", "--limit", "1", "--results-dir", str(results)]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=offline_env(home), capture_output=True, text=True, timeout=300)


def test_layout_is_what_huggingface_hub_reads(populated_cache):
    from huggingface_hub import try_to_load_from_cache

    home, snapshot, _ = populated_cache
    for name in ("config.json", "model.safetensors"):
        found = try_to_load_from_cache(HUB_ID, name, cache_dir=home / "hub")
        assert found == str(snapshot / name)
        assert (snapshot / name).is_symlink() and Path(found).resolve().parent.name == "blobs"


def test_hub_id_loads_the_same_tensors_as_the_snapshot_dir(populated_cache):
    _, snapshot, expected = populated_cache
    assert load_weights(ARCH.spec, str(snapshot), seed=0).sha256 == expected


def test_cli_runs_a_hub_id_offline_from_the_cache(populated_cache, tmp_path):
    home, _, expected = populated_cache
    proc = run_cli(home, tmp_path / "results")
    assert proc.returncode == 0, proc.stderr
    rows = [r for f in sorted((tmp_path / "results").glob("v*/*.jsonl")) for r in read_jsonl(f)]
    assert {r["model"] for r in rows} == {"gpt2-scratch", "gpt2-hf"}
    assert {r["weights"] for r in rows} == {HUB_ID}
    assert {r["weights_sha256"] for r in rows} == {expected}
    value = {(r["model"], r["metric"]): r["value"] for r in rows}
    assert value["gpt2-scratch", "max_abs_logit_diff"] <= 1e-5
    assert value["gpt2-scratch", "greedy_tokens_equal"] == 1.0
    assert value["gpt2-scratch", "word_perplexity"] == pytest.approx(value["gpt2-hf", "word_perplexity"], rel=1e-6)


@pytest.mark.parametrize("cached", ["other-repo", "config-only"])
def test_cli_hub_id_missing_from_the_cache_is_a_one_line_error(tmp_path, populated_cache, cached):
    """Not cached at all (the cache holds another repo only), or an interrupted download (no weights)."""
    home = tmp_path / "hf_home"
    if cached == "other-repo":
        write_hub_cache(home / "hub", "someone/other-model", {"config.json": b"{}"})
    else:
        config = (populated_cache[1] / "config.json").read_bytes()
        write_hub_cache(home / "hub", HUB_ID, {"config.json": config})
    proc = run_cli(home, tmp_path / "results")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and f"'{HUB_ID}'" in lines[0]
    assert ("cache" if cached == "other-repo" else "model.safetensors") in lines[0]
