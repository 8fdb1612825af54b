"""`throughput.lm_eval_process=true`: the `ppl` comparison of `lm_eval_ppl`, but as two whole processes,
the way a user would run either tool from a shell:

- ours: `python -m harness run --model M --weights W --seed S --device D --tasks ppl --limit N --set ppl.batch_size=B`
  (a throwaway results directory);
- theirs: `python -m lm_eval run --model hf --model_args pretrained=DIR,dtype=float32 --tasks
  wikitext_local --batch_size B --device cpu` on the reference's weights saved as a Hugging Face
  directory (`save_pretrained`), with lm-eval's own `wikitext` task reading the same N documents.

Each sample is one process from spawn to exit: Python start-up, imports, loading the weights and
tokenising are inside it, as they are for a user. Wall seconds (`clock=wall`) or the child's CPU
seconds (`clock=cpu`, from `getrusage(RUSAGE_CHILDREN)`). With `threads` > 0 both processes get
`OMP_NUM_THREADS` set to it. One untimed run of each side first (the file cache), then
`lm_eval_repeats` timed runs, interleaved. Both sides report their word perplexity.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.api import HarnessError, Metric
from tasks.throughput.lm_eval_ppl import comparison_rows, hf_tokenizer, write_lm_eval_task

if TYPE_CHECKING:
    from harness.api import CausalLM
    from tasks.throughput.config import ThroughputConfig
    from tasks.throughput.task import Throughput


def ppl_processes_vs_lm_eval(task: Throughput, model: CausalLM, reference: CausalLM,
                             seed: int) -> tuple[list[Metric], list[Metric]]:
    """(rows for the scratch model, rows for the reference): whole-process ppl tokens/s, ours vs lm-eval's."""
    cfg = task.config
    with tempfile.TemporaryDirectory() as tmp:
        commands, tokens = _commands(model, reference, cfg, seed, Path(tmp))
        outputs: dict[str, float] = {}
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        if cfg.threads:
            env["OMP_NUM_THREADS"] = str(cfg.threads)
        seconds: dict[str, list[float]] = {"ours": [], "lm_eval": []}
        for i in range(1 + cfg.lm_eval_repeats):  # run 0 warms the file cache and is not kept
            for side in (("ours", "lm_eval") if i % 2 else ("lm_eval", "ours")):
                took = run_timed(commands[side].argv, env, cfg.clock)
                outputs[side] = commands[side].read()
                if i:
                    seconds[side].append(took)
    subtask = f"ppl process wikitext-2 test docs={cfg.lm_eval_docs} b={cfg.lm_eval_batch_size}"
    check = {"tokens": tokens, "word_perplexity_ours": outputs["ours"], "word_perplexity_lm_eval": outputs["lm_eval"],
             "clock": cfg.clock, "unit": "tokens/s of the whole process (start-up and loading included)"}
    extra = {side: {"command": " ".join(commands[side].shown), "samples_s": seconds[side]} for side in seconds}
    return comparison_rows(task, "ppl_process_tokens_per_s", subtask, seconds, check, extra, model, reference,
                           counted=True)


class Command:
    """One side's argv, how the rows show it (temporary paths named by role), and how to read the
    word perplexity it wrote."""

    def __init__(self, argv: list[str], shown: list[str], read: Callable[[], float]) -> None:
        self.argv, self.shown, self.read = argv, shown, read


def _commands(model: CausalLM, reference: CausalLM, cfg: ThroughputConfig, seed: int, tmp: Path):
    """Both commands and the number of tokens they score."""
    from harness.api.data import detokenize, load_wikitext_documents

    docs = load_wikitext_documents("test")[: cfg.lm_eval_docs]
    write_lm_eval_task(docs, tmp)
    ref_dir = tmp / "reference"
    reference.module.save_pretrained(ref_dir, safe_serialization=True)
    hf_tokenizer(reference).save_pretrained(ref_dir)
    batch = str(cfg.lm_eval_batch_size)
    ours = ["run", "--model", model.name, *(["--reference", reference.name] if ":" in model.name else []),
            "--weights", model.weights.identity, "--seed", str(seed), "--device", model.device.type, "--tasks", "ppl",
            "--limit", str(cfg.lm_eval_docs), "--set", f"ppl.batch_size={batch}"]

    def theirs(model_dir: object, task_dir: object) -> list[str]:
        return ["run", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
                "--tasks", "wikitext_local", "--include_path", str(task_dir), "--batch_size", batch,
                "--device", str(reference.device)]

    ours_dir, theirs_out, py = tmp / "harness-results", tmp / "lm-eval-out", sys.executable
    tokens = sum(len(t) for t in model.tokenizer.encode_batch([detokenize(d) for d in docs]))
    return {
        "ours": Command([py, "-m", "harness", *ours, "--results-dir", str(ours_dir)], ["harness", *ours],
                        lambda: _read_ours(ours_dir)),
        "lm_eval": Command([py, "-m", "lm_eval", *theirs(ref_dir, tmp), "--output_path", str(theirs_out)],
                           ["lm_eval", *theirs("REFERENCE_DIR", "TASK_DIR")], lambda: _read_theirs(theirs_out)),
    }, tokens


def run_timed(argv: list[str], env: dict[str, str], clock: str) -> float:
    """Seconds of one child process (wall, or its user + system CPU time); a failure is one line."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise HarnessError(f"throughput.lm_eval_process: `{' '.join(argv[1:4])} ...` exited {done.returncode}: {last}")
    if clock == "cpu":
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall


def _read_ours(results_dir: Path) -> float:
    rows = [json.loads(line) for f in sorted(results_dir.rglob("*.jsonl")) for line in f.read_text().splitlines()]
    return next(r["value"] for r in reversed(rows) if r["task"] == "ppl" and r["metric"] == "word_perplexity")


def _read_theirs(output_path: Path) -> float:
    found = sorted(output_path.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise HarnessError(f"throughput.lm_eval_process: lm-eval wrote no results under {output_path}")
    return json.loads(found[-1].read_text())["results"]["wikitext_local"]["word_perplexity,none"]
