"""The throughput task on the tiny config with tiny grids: rows are well formed, never how fast they are."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from harness.api import TASKS, HarnessError, load_results, make_config
from harness.runner import RunPlan, run
from reproductions.gpt2 import GPT2, GPT2Config
from tasks.throughput.config import ThroughputConfig
from tasks.throughput.flops import forward_flops_per_token, matmul_params
from tasks.throughput.report import throughput_section
from tasks.throughput.timing import PeakMemory, summary

TINY_GRID = {"batch_sizes": "1,2", "seq_lens": "8,16,4096", "decode_batch_sizes": "1,2", "prompt_len": "4",
             "new_tokens": "4", "train_batch_size": "2", "train_seq_len": "16", "repeats": "2",
             "min_sample_s": "0.002", "matmul_size": "256", "threads": "1"}
KINDS = ("prefill", "decode", "train")


def _run(results_dir: Path, models: list[str], **overrides: str):
    plan = RunPlan(models=models, tasks=["throughput"], weights="random:tiny", seed=0,
                   results_dir=str(results_dir), overrides={"throughput": {**TINY_GRID, **overrides}})
    store, failures = run(plan)
    assert failures == []
    return store


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    threads = torch.get_num_threads()
    results = tmp_path_factory.mktemp("throughput")
    store = _run(results, ["gpt2-scratch", "gpt2-hf"])
    assert torch.get_num_threads() == threads  # throughput.threads is restored afterwards
    return results, store.rows


def _by(rows, model):
    return {(r.subtask, r.metric): r for r in rows if r.model == model}


def test_grid_points_are_the_subtasks(pair_run):
    _, rows = pair_run
    subtasks = {r.subtask for r in rows if r.model == "gpt2-scratch" and r.metric.endswith("tokens_per_s")}
    assert subtasks == {"prefill b=1 t=8", "prefill b=1 t=16", "prefill b=2 t=8", "prefill b=2 t=16",
                        "decode b=1 prompt=4 new=4", "decode b=2 prompt=4 new=4", "train b=2 t=16"}  # t=4096 > max


def test_every_scratch_measurement_has_a_ratio_row(pair_run):
    _, rows = pair_run
    ours = _by(rows, "gpt2-scratch")
    speeds = [(s, m) for s, m in ours if m.endswith("_tokens_per_s")]
    assert speeds
    for subtask, metric in speeds:
        ratio = ours[subtask, f"{metric}_ratio"]
        assert ratio.value > 0 and ratio.higher_is_better
        assert ratio.extra["reference"] == "gpt2-hf"
        assert math.isclose(ours[subtask, metric].extra["ratio_vs_reference"], ratio.value)
        assert ratio.extra["q1"] <= ratio.value <= ratio.extra["q3"]


def test_reference_rows_were_measured_beside_the_scratch_model(pair_run):
    _, rows = pair_run
    ours, theirs = _by(rows, "gpt2-scratch"), _by(rows, "gpt2-hf")
    assert not any(m.endswith("_ratio") for _, m in theirs)
    assert {k for k in ours if not k[1].endswith("_ratio")} == set(theirs)
    for subtask, metric in ours:
        if metric.endswith("_tokens_per_s"):
            assert theirs[subtask, metric].extra["measured_beside"] == "gpt2-scratch"
            assert ours[subtask, f"{metric}_ratio"].extra["reference_value"] == theirs[subtask, metric].value


def test_mfu_and_peaks_are_plausible(pair_run):
    _, rows = pair_run
    mfu = [r for r in rows if r.metric == "mfu"]
    assert {r.subtask.split()[0] for r in mfu} == {"prefill", "train"}  # decode is memory bound: no mfu
    assert all(0 < r.value < 1.5 for r in mfu)
    peaks = [r for r in rows if r.metric == "matmul_peak_flops" and r.model == "gpt2-scratch"]
    assert peaks[0].subtask == "matmul fp32 n=256" and all(r.value > 0 for r in peaks)
    assert all(r.extra["threads"] == 1 for r in rows if "threads" in r.extra)


def test_prefill_has_its_kernel_bound(pair_run):
    _, rows = pair_run
    for model in ("gpt2-scratch", "gpt2-hf"):
        by = _by(rows, model)
        prefills = {s for s, m in by if m == "prefill_tokens_per_s"}
        assert {s for s, m in by if m == "mfu_bound"} == prefills == {s for s, m in by if m == "mfu_bound_fraction"}
        for subtask in prefills:
            bound, fraction, mfu = (by[subtask, k] for k in ("mfu_bound", "mfu_bound_fraction", "mfu"))
            assert bound.value > 0 and fraction.value > 0 and len(bound.extra["samples_s"]) == 2
            # the fraction is per back-to-back sample, the mfu and bound medians: equal up to pairing
            assert fraction.extra["min"] * 0.999 <= mfu.value / bound.value <= fraction.extra["max"] * 1.001
    assert not any(r.metric.startswith("mfu_bound") for r in rows if not r.subtask.startswith("prefill"))


def test_kernels_call_runs_each_matmul_and_the_attention(monkeypatch):
    from harness.generate import load_model
    from tasks.throughput import calls

    model = load_model("gpt2-scratch", "random:tiny")
    seen = []
    monkeypatch.setattr(calls.F, "linear", lambda x, w: seen.append((tuple(x.shape), tuple(w.shape))))
    monkeypatch.setattr(calls.F, "scaled_dot_product_attention", lambda q, k, v, is_causal: seen.append(q.shape))
    calls.kernels_call(model, 2, 8, seed=0)()
    cfg = model.module.config
    d, vocab = cfg.n_embd, cfg.vocab_size + (-cfg.vocab_size % 64)
    block = [((16, d), (3 * d, d)), ((16, d), (d, d)), ((16, d), (4 * d, d)), ((16, 4 * d), (d, 4 * d))]
    assert seen == block * cfg.n_layer + [((16, d), (vocab, d))] + [(2, cfg.n_head, 8, d // cfg.n_head)] * cfg.n_layer


def test_memory_rows(pair_run):
    _, rows = pair_run
    memory = {r.subtask: r.value for r in rows if r.metric == "peak_memory_mb" and r.model == "gpt2-scratch"}
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc")
    assert set(memory) >= {"train b=2 t=16", "prefill b=1 t=8"} and all(v >= 0 for v in memory.values())
    assert memory["train b=2 t=16"] > 0  # a model copy and AdamW state at least


def test_reference_alone_is_measured_on_its_own(tmp_path):
    rows = _run(tmp_path, ["gpt2-hf"], batch_sizes="1", seq_lens="8", decode_batch_sizes="1", clock="cpu").rows
    metrics = {r.metric for r in rows}
    assert {"prefill_tokens_per_s", "decode_tokens_per_s", "train_tokens_per_s", "mfu"} <= metrics
    assert not any(m.endswith("_ratio") for m in metrics)
    assert all(r.extra.get("measured_beside") is None for r in rows)


def test_tuple_grids_parse_from_set_values():
    cfg = make_config(TASKS.get("throughput"), {"batch_sizes": "1, 8", "seq_lens": "128,512,1024", "lm_eval": "true"})
    assert cfg.batch_sizes == (1, 8) and cfg.seq_lens == (128, 512, 1024) and cfg.lm_eval is True
    assert ThroughputConfig().decode_batch_sizes == (1, 8)


@pytest.mark.parametrize("overrides", [{"batch_sizes": "0,1"}, {"seq_lens": ","}, {"repeats": "0"},
                                       {"threads": "-1"}, {"kinds": "prefill,ppl"}],
                         ids=["zero-batch", "empty-grid", "no-repeats", "threads", "unknown-kind"])
def test_bad_grids_are_one_line_errors(overrides):
    with pytest.raises(HarnessError, match="throughput"):
        make_config(TASKS.get("throughput"), overrides)


def test_kinds_choose_the_grid_measurements():
    from tasks.throughput.calls import plan

    cfg = make_config(TASKS.get("throughput"), {**TINY_GRID, "kinds": "decode,train"})
    model = _Stub()
    assert {m.kind for m in plan(cfg, [model], 0)} == {"decode", "train"}
    assert plan(make_config(TASKS.get("throughput"), {"kinds": "none"}), [model], 0) == []


class _Stub:
    max_length = 64

    def can(self, capability):
        return True


def test_flops_per_token_counts_the_unembedding_once():
    cfg = GPT2Config.from_name("gpt2")
    with torch.device("meta"):
        module = GPT2(cfg)
    n = matmul_params(module, cfg.vocab_size, cfg.n_embd)
    assert n == 124_439_808 - cfg.block_size * cfg.n_embd  # all but the position table; wte is the head
    assert forward_flops_per_token(n, 12, 768, 1024) == 2 * n + 2 * 12 * 1024 * 768


def test_summary_quartiles():
    s = summary([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"]) == (3.0, 2.0, 4.0, 1.0, 5.0)
    assert summary([7.0])["q3"] == 7.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc")
def test_peak_memory_sees_a_50mb_tensor():
    with PeakMemory(torch.device("cpu")) as memory:
        x = torch.ones(50 * 2**20 // 4)
        del x
    assert memory.growth_mb >= 45


def test_report_section_writes_a_ratio_table_and_a_plot(pair_run, tmp_path):
    results, _ = pair_run
    md = throughput_section(load_results(results), tmp_path / "figures", tmp_path)
    assert "| gpt2-scratch | gpt2-hf | `random:tiny` | prefill b=1 t=8 | prefill tokens/s |" in md
    assert "| decode b=2 prompt=4 new=4 | decode tokens/s |" in md and "| train tokens/s |" in md
    assert "peak memory MB (lower is better)" in md and "| train b=2 t=16 |" in md  # the MFU table
    prefill = next(line for line in md.splitlines() if line.startswith("| prefill b=1 t=8 |") and "%" in line)
    assert prefill.count("(GEMMs + attention alone: ") == 2  # both models' MFU beside their ceiling
    train = next(line for line in md.splitlines() if line.startswith("| train b=2 t=16 |") and "%" in line)
    assert "alone" not in train  # no bound measured for training
    assert (tmp_path / "figures" / "throughput_prefill.png").stat().st_size > 0
    assert "](figures/throughput_prefill.png)" in md


@pytest.mark.slow
def test_ppl_against_lm_eval_scores_the_same_documents(tmp_path, capfd):
    pytest.importorskip("lm_eval")
    rows = _run(tmp_path, ["gpt2-scratch", "gpt2-hf"], batch_sizes="1", seq_lens="8", decode_batch_sizes="1",
                lm_eval="true", lm_eval_docs="1").rows
    assert "Running loglikelihood requests" not in capfd.readouterr().err  # lm-eval's own bars stay off
    ours = next(r for r in rows if r.metric == "ppl_tokens_per_s" and r.model == "gpt2-scratch")
    assert math.isclose(ours.extra["word_perplexity_ours"], ours.extra["word_perplexity_lm_eval"], rel_tol=1e-4)
    assert any(r.metric == "ppl_tokens_per_s_ratio" for r in rows)
    assert any(r.metric == "ppl_tokens_per_s" and r.model == "gpt2-hf" for r in rows)


@pytest.mark.slow
def test_ppl_as_whole_processes_runs_both_clis_on_the_same_documents(tmp_path):
    """`harness run` and the `lm_eval` CLI as child processes (1-2 min): both score the same text."""
    pytest.importorskip("lm_eval")
    rows = _run(tmp_path, ["gpt2-scratch", "gpt2-hf"], kinds="none", lm_eval_process="true", lm_eval_docs="1").rows
    assert {r.metric for r in rows} == {"ppl_process_tokens_per_s", "ppl_process_tokens_per_s_ratio"}
    ours = next(r for r in rows if r.metric == "ppl_process_tokens_per_s" and r.model == "gpt2-scratch")
    assert math.isclose(ours.extra["word_perplexity_ours"], ours.extra["word_perplexity_lm_eval"], rel_tol=1e-4)
    want = "harness run --model gpt2-scratch --weights random:tiny --seed 0 --device cpu --tasks ppl --limit 1"
    assert ours.extra["command"].startswith(want)
    theirs = next(r for r in rows if r.metric == "ppl_process_tokens_per_s" and r.model == "gpt2-hf")
    assert theirs.extra["command"].startswith("lm_eval run --model hf --model_args pretrained=REFERENCE_DIR")
    ratio = next(r for r in rows if r.metric == "ppl_process_tokens_per_s_ratio")
    assert math.isclose(ratio.extra["value"], ours.value) and math.isclose(ratio.extra["reference_value"], theirs.value)


def test_a_failing_child_process_is_one_line(tmp_path):
    from tasks.throughput.ppl_process import run_timed

    argv = [sys.executable, "-c", "import sys; print('first', file=sys.stderr); sys.exit('the real cause')"]
    with pytest.raises(HarnessError, match="exited 1: the real cause$"):
        run_timed(argv, dict(os.environ), "wall")
    assert run_timed([sys.executable, "-c", "pass"], dict(os.environ), "cpu") >= 0


def test_batch_one_decode_has_a_memory_roofline(pair_run):
    """decode b=1 is held to bytes of weights per token / bandwidth measured beside it (rows, no speed asserted)."""
    from tasks.throughput.calls import decode_weights

    _, rows = pair_run
    read_bytes = []
    for model in ("gpt2-scratch", "gpt2-hf"):
        by = _by(rows, model)
        sub = "decode b=1 prompt=4 new=4"
        roofline, fraction = by[sub, "decode_roofline"], by[sub, "decode_roofline_fraction"]
        bandwidth = by[sub, "memory_bandwidth_bytes_per_s"]
        assert roofline.value > 0 and fraction.value > 0
        assert math.isclose(bandwidth.value, roofline.value * roofline.extra["weight_bytes_per_token"])
        read_bytes.append(roofline.extra["weight_bytes_per_token"])
        assert ("decode b=2 prompt=4 new=4", "decode_roofline") not in by  # batch 1 only
    cfg = GPT2Config.from_name("tiny")
    weights = decode_weights(GPT2(cfg))
    assert sum(w.numel() for w in weights) == 2 * (4 * 32 * 32 + 8 * 32 * 32) + 1000 * 32  # blocks + tied head
    # one read of the scratch model's weights, which the reference shares (HF's Conv1D is no nn.Linear)
    assert read_bytes[0] == read_bytes[1]


def test_decode_copy_is_input_major_and_decodes_the_same_tokens():
    from harness.api import MODELS, load_weights
    from harness.models.causal import InputMajorLinear

    spec = MODELS.get("gpt2-scratch")
    model = spec.build(load_weights(spec.arch, "random:tiny", seed=0), "cpu")
    x = torch.randint(0, 1000, (3, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate_batch(x, 6), model.module.generate(x, 6, temperature=0.0))
    assert torch.equal(model.generate_batch(x[:1], 6), model.module.generate(x[:1], 6, temperature=0.0))  # 1 row
    copy = model._decode_copies.get(model.module)
    mlp = copy.transformer.h[0].mlp  # 32 -> 128 streams faster input-major, 128 -> 32 as (out, in)
    assert mlp.c_fc.weight_t is not None and mlp.c_proj.weight_t is None
    assert all(not isinstance(m, torch.nn.Linear) for m in copy.modules())
    assert any(isinstance(m, InputMajorLinear) for m in copy.modules())
    assert copy.transformer.wte.weight is model.module.transformer.wte.weight  # shared, not copied
    block = model.module.transformer.h[0]
    assert isinstance(model.module.lm_head, torch.nn.Linear) and isinstance(block.attn.c_attn, torch.nn.Linear)


def test_lm_eval_bars_are_off_inside_and_restored_after():
    pytest.importorskip("lm_eval")
    import importlib

    from tasks.throughput.lm_eval_ppl import LM_EVAL_BAR_MODULES, lm_eval_bars_off

    modules = [importlib.import_module(name) for name in LM_EVAL_BAR_MODULES]
    before = [m.tqdm for m in modules]
    with lm_eval_bars_off():
        assert all(m.tqdm(range(3), disable=False).disable for m in modules)  # an explicit False is overridden
    assert [m.tqdm for m in modules] == before


def test_the_roofline_reads_each_weight_in_either_layout_with_the_same_product():
    from tasks.throughput.calls import fastest_layout

    w = torch.randn(48, 20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fastest_layout(w)(), torch.ones(1, 20) @ w.t(), rtol=1e-6, atol=1e-6)
