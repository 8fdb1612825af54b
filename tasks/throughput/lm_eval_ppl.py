"""`throughput.lm_eval=true`: tokens/s of the `ppl` task on the scratch model against lm-eval's own HF
backend (`lm_eval.simple_evaluate` + `HFLM`) on the reference module, on the first `lm_eval_docs`
WikiText-2 test documents with the same batch size. Both sides also report the word perplexity
they computed, so a reader can see that they scored the same text.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from harness.api import Metric, RunContext
from tasks.throughput.config import ThroughputConfig
from tasks.throughput.timing import machine, summary

if TYPE_CHECKING:
    from harness.api import CausalLM
    from tasks.throughput.task import Throughput


def has_lm_eval() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def ppl_vs_lm_eval(task: Throughput, model: CausalLM, reference: CausalLM,
                   seed: int) -> tuple[list[Metric], list[Metric]]:
    """(rows for the scratch model, rows for the reference): ppl tokens/s, ours vs lm-eval's."""
    cfg = task.config
    with tempfile.TemporaryDirectory() as tmp:
        ours_call, theirs_call, outputs, tokens = _ppl_calls(model, reference, cfg, seed, Path(tmp))
        timer = replace(task.timer(model.device), warmup=1, repeats=cfg.lm_eval_repeats, min_sample_s=0.0)
        samples = timer.interleaved({"ours": lambda: ours_call, "lm_eval": lambda: theirs_call})
    subtask = f"ppl wikitext-2 test docs={cfg.lm_eval_docs} b={cfg.lm_eval_batch_size}"
    check = {"tokens": tokens, "word_perplexity_ours": outputs["ours"],
             "word_perplexity_lm_eval": outputs["lm_eval"]}
    return comparison_rows(task, "ppl_tokens_per_s", subtask, {k: samples[k].seconds for k in samples}, check,
                           {"ours": {"scorer": "harness ppl task"},
                            "lm_eval": {"scorer": "lm_eval.simple_evaluate + HFLM"}}, model, reference)


def comparison_rows(task: Throughput, metric: str, subtask: str, seconds: dict[str, list[float]], check: dict,
                    extra: dict[str, dict], model: CausalLM, reference: CausalLM,
                    counted: bool = False) -> tuple[list[Metric], list[Metric]]:
    """(rows for the scratch model, rows for the reference) of one ppl comparison: tokens/s of each side
    (`seconds["ours"]`, `seconds["lm_eval"]`, samples taken in pairs) and the ratio, with `check` and
    each side's own `extra` in the rows; `counted`: each tokens/s row's n is its number of samples."""
    tokens = check["tokens"]
    ours, theirs = (summary([tokens / s for s in seconds[k]]) for k in ("ours", "lm_eval"))
    ratio = summary([t / o for o, t in zip(seconds["ours"], seconds["lm_eval"])])
    n = {k: len(seconds[k]) if counted else None for k in ("ours", "lm_eval")}
    mine = [task.metric(metric, ours["median"], subtask=subtask, n=n["ours"], extra={
                **check, **extra["ours"], "ratio_vs_reference": ratio["median"], **machine()}),
            task.ratio_row(f"{metric}_ratio", subtask, ratio, reference, ours["median"], theirs["median"])]
    rows_theirs = [task.metric(metric, theirs["median"], subtask=subtask, n=n["lm_eval"], extra={
        **check, **extra["lm_eval"], "measured_beside": model.name, **machine()})]
    return mine, rows_theirs


def _ppl_calls(model: CausalLM, reference: CausalLM, cfg: ThroughputConfig, seed: int, tmp: Path):
    """The two timed calls (our ppl task on `model`, lm-eval on `reference`), where each stores its
    word perplexity in `outputs`, and the number of tokens both score."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from harness.api.data import detokenize, load_wikitext_documents
    from tasks.ppl import Perplexity, PplConfig

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the documents are a local file: never ask the hub
    docs = load_wikitext_documents("test")[: cfg.lm_eval_docs]
    task_manager = TaskManager(include_path=str(write_lm_eval_task(docs, tmp)))
    lm = HFLM(pretrained=reference.module, tokenizer=hf_tokenizer(reference), batch_size=cfg.lm_eval_batch_size,
              device=str(reference.device))
    ppl = Perplexity(PplConfig(batch_size=cfg.lm_eval_batch_size))
    ctx = RunContext(seed, cfg.lm_eval_docs, str(model.device), lambda m: None, lambda it, **kw: it)
    outputs: dict[str, float] = {}

    def ours() -> None:
        outputs["ours"] = next(r.value for r in ppl.run(model, ctx) if r.metric == "word_perplexity")

    def theirs() -> None:
        with lm_eval_bars_off():
            out = lm_eval.simple_evaluate(model=lm, tasks=["wikitext_local"], task_manager=task_manager)
        outputs["lm_eval"] = out["results"]["wikitext_local"]["word_perplexity,none"]

    tokens = sum(len(t) for t in model.tokenizer.encode_batch([detokenize(d) for d in docs]))
    return ours, theirs, outputs, tokens


# lm-eval's modules that draw tqdm bars on the way through `simple_evaluate` + HFLM.
LM_EVAL_BAR_MODULES = ("lm_eval.models.huggingface", "lm_eval.api.model", "lm_eval.api.task")


@contextmanager
def lm_eval_bars_off() -> Iterator[None]:
    """lm-eval's progress bars off while it runs inside our own: `HFLM.loglikelihood_rolling` passes
    `disable_tqdm=False` explicitly (lm-eval 0.4.13), so neither TQDM_DISABLE nor an argument reaches
    it; each module's `tqdm` name is swapped for one that is always disabled, then put back."""
    import importlib

    from tqdm import tqdm

    def quiet(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    modules = [importlib.import_module(name) for name in LM_EVAL_BAR_MODULES]
    saved = [(m, m.tqdm) for m in modules if hasattr(m, "tqdm")]
    for module, _ in saved:
        module.tqdm = quiet
    try:
        yield
    finally:
        for module, original in saved:
            module.tqdm = original


def write_lm_eval_task(docs: list[str], tmp: Path) -> Path:
    """lm-eval's own `wikitext` task, reading our vendored documents from a local JSON Lines file."""
    import json

    import lm_eval

    (tmp / "docs.jsonl").write_text("".join(json.dumps({"page": d}) + "\n" for d in docs), encoding="utf-8")
    builtin = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "wikitext.yaml"
    (tmp / "wikitext_local.yaml").write_text(
        f"include: {builtin}\ntask: wikitext_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp / 'docs.jsonl'}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n", encoding="utf-8")
    return tmp


def hf_tokenizer(reference: CausalLM):
    """The reference's tokenizer as lm-eval's HF backend takes it: EOS the end-of-text token, BOS the
    token our `ppl` conditions the first token on (`prefix_token_id`: the declared BOS, else EOS), so
    both sides follow the same prefix rule."""
    from transformers import PreTrainedTokenizerFast

    tok = reference.tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.backend.id_to_token(tok.eot_id),
                                   bos_token=tok.backend.id_to_token(tok.prefix_token_id))
