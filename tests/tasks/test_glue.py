"""Task `glue`: strict TSV parsing of the vendored files, metrics, bootstrap, recipe, end-to-end runs."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from harness.api import TASKS, HarnessError, RunContext, UnknownNameError, load_plugins, load_results, make_config
from harness.runner import RunPlan, run
from tasks import glue
from tasks.glue import (
    Glue,
    GlueConfig,
    bootstrap,
    compute_metric,
    load_split,
    local_split,
    make_optimizer,
    seeded_subset,
    subtask,
    train_batches,
)

load_plugins()

# Data rows (header excluded) and label counts, as listed in tasks/data/README.md.
ROW_COUNTS = [
    ("cola", "train", 8551, {1: 6023, 0: 2528}), ("cola", "dev", 1043, {1: 721, 0: 322}),
    ("sst2", "train", 67349, {1: 37569, 0: 29780}), ("sst2", "dev", 872, {1: 444, 0: 428}),
    ("mrpc", "train", 3668, {1: 2474, 0: 1194}), ("mrpc", "dev", 408, {1: 279, 0: 129}),
    ("rte", "train", 2490, {0: 1249, 1: 1241}), ("rte", "dev", 277, {0: 146, 1: 131}),  # 0 = entailment
    ("stsb", "train", 5749, None), ("stsb", "dev", 1500, None),
    ("wnli", "train", 635, {0: 323, 1: 312}), ("wnli", "dev", 71, {0: 40, 1: 31}),
    ("qnli", "dev", 5463, {1: 2761, 0: 2702}),  # 1 = not_entailment
]


@pytest.mark.parametrize("name, split, rows, labels", ROW_COUNTS, ids=[f"{n}-{s}" for n, s, *_ in ROW_COUNTS])
def test_vendored_row_and_label_counts(name, split, rows, labels):
    ds = load_split(name, split)
    assert len(ds) == rows
    if labels is None:
        assert min(ds["label"]) >= 0.0 and max(ds["label"]) <= 5.0
    else:
        assert Counter(ds["label"]) == labels
    assert ("text_b" in ds.column_names) == (len(subtask(name).text_columns) == 2)


def test_mrpc_bom_is_stripped_and_cola_has_no_header():
    assert (glue.DATA_DIR / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality")
    mrpc = load_split("mrpc", "train")
    assert mrpc[0]["text_a"].startswith("Amrozi accused his brother")
    cola = load_split("cola", "train")
    assert cola[0]["text_a"] == "Our friends won't buy this analysis, let alone the next one we propose."


def _fake_glue(tmp_path, monkeypatch, text: str, folder: str = "SST-2"):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "train.tsv").write_text(text, encoding="utf-8")
    monkeypatch.setattr(glue, "DATA_DIR", tmp_path)
    return tmp_path / folder / "train.tsv"


def test_malformed_row_names_file_and_line(tmp_path, monkeypatch):
    path = _fake_glue(tmp_path, monkeypatch, "sentence\tlabel\ngood one\t1\nno tab here\n")
    with pytest.raises(HarnessError, match=rf"{path}:3: expected 2 tab-separated fields, found 1"):
        local_split(subtask("sst2"), "train")


def test_quotes_do_not_merge_rows(tmp_path, monkeypatch):
    _fake_glue(tmp_path, monkeypatch, 'sentence\tlabel\n"an open quote\t1\nnext row "\t0\n')
    assert local_split(subtask("sst2"), "train")["label"] == [1, 0]


def test_label_outside_the_label_set_is_an_error(tmp_path, monkeypatch):
    path = _fake_glue(tmp_path, monkeypatch, "sentence\tlabel\ngood\t1\nbad\t2\n")
    with pytest.raises(HarnessError, match=rf"{path}:3: sst2 label '2' is not one of 0, 1"):
        local_split(subtask("sst2"), "train")


def test_wrong_header_is_an_error(tmp_path, monkeypatch):
    path = _fake_glue(tmp_path, monkeypatch, "text\tlabel\ngood\t1\n")
    with pytest.raises(HarnessError, match=f"{path}:1: expected the header"):
        local_split(subtask("sst2"), "train")


def test_stsb_score_out_of_range_is_an_error(tmp_path, monkeypatch):
    header = "\t".join(subtask("stsb").columns)
    row = "\t".join(["0", "g", "f", "y", "0", "s", "s", "a", "b", "7.5"])
    path = _fake_glue(tmp_path, monkeypatch, f"{header}\n{row}\n", folder="STS-B")
    with pytest.raises(HarnessError, match=rf"{path}:2: stsb score '7.5'"):
        local_split(subtask("stsb"), "train")


def test_unknown_subtask_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="unknown GLUE subtask 'sst3'; known subtasks: cola, mrpc, qnli"):
        Glue(make_config(Glue, {"subtasks": "sst2,sst3"}))


def test_config_knobs_have_the_documented_names():
    cfg = make_config(Glue, {"subtasks": "rte,wnli", "lr": "3e-5", "epochs": "2", "batch_size": "16",
                             "max_train_examples": "none", "max_seq_len": "64", "eval_batch_size": "8",
                             "warmup_ratio": "0.2", "weight_decay": "0", "max_eval_examples": "100",
                             "source": "hub", "bootstrap": "0"})
    assert cfg.subtasks == ("rte", "wnli") and cfg.max_train_examples is None and cfg.source == "hub"
    default = GlueConfig()
    assert default.max_seq_len == 128 and default.warmup_ratio == 0.1 and default.bootstrap == 1000
    with pytest.raises(HarnessError, match="expected one of local, hub"):
        make_config(Glue, {"source": "web"})


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(HarnessError, match="glue.source=hub: cannot load nyu-mll/glue/wnli"):
        glue.hub_split(subtask("wnli"), "dev")


# -- metrics -------------------------------------------------------------------------------------

PREDS, LABELS = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])  # tp 2, tn 1, fp 1, fn 0


@pytest.mark.parametrize("metric, preds, labels, expected", [
    ("accuracy", PREDS, LABELS, 0.75),
    ("f1", PREDS, LABELS, 0.8),  # precision 2/3, recall 1
    ("matthews_correlation", PREDS, LABELS, 2 / math.sqrt(12)),  # (tp tn - fp fn) / sqrt(3 * 2 * 2 * 1)
    ("pearson", np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]), 3 / math.sqrt(2 * 42 / 9)),
    ("spearmanr", np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]), 0.5),  # 1 - 6 * 2 / (3 * 8)
    ("pearson", np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 4.0]), 0.0),  # constant: no association
], ids=["accuracy", "f1", "mcc", "pearson", "spearman", "constant"])
def test_metrics_match_hand_computed_values(metric, preds, labels, expected):
    assert compute_metric(metric, preds, labels) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_is_deterministic_and_brackets_the_value():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    preds = np.where(rng.random(200) < 0.8, labels, 1 - labels)
    a = bootstrap("accuracy", preds, labels, resamples=300, seed=5)
    assert a == bootstrap("accuracy", preds, labels, resamples=300, seed=5)
    assert a != bootstrap("accuracy", preds, labels, resamples=300, seed=6)
    value = compute_metric("accuracy", preds, labels)
    assert a.low < value < a.high and a.stderr == pytest.approx(math.sqrt(value * (1 - value) / 200), rel=0.25)
    assert bootstrap("accuracy", preds, labels, resamples=0, seed=5) is None


# -- recipe --------------------------------------------------------------------------------------


def test_seeded_subset_is_deterministic():
    ds = load_split("wnli", "dev")
    a, b = seeded_subset(ds, 10, 0, keep_order=True), seeded_subset(ds, 10, 0, keep_order=True)
    assert a["text_a"] == b["text_a"] and a["text_a"] != seeded_subset(ds, 10, 1, keep_order=True)["text_a"]
    order = [ds["text_a"].index(t) for t in a["text_a"]]
    assert order == sorted(order)
    assert seeded_subset(ds, None, 0, keep_order=True) is ds


def test_train_batches_cover_each_row_once_per_epoch():
    batches = train_batches(10, 4, epochs=2, seed=0)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(batches[:3], [])) == list(range(10)) == sorted(sum(batches[3:], []))
    assert batches == train_batches(10, 4, epochs=2, seed=0) != train_batches(10, 4, epochs=2, seed=1)


def test_linear_warmup_then_linear_decay():
    module = torch.nn.Linear(2, 2)
    opt, schedule = make_optimizer(module, GlueConfig(lr=1.0, warmup_ratio=0.2), steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]  # matrices decay, biases do not


# -- end to end ----------------------------------------------------------------------------------

TINY = {"subtasks": "sst2,stsb,mrpc", "max_train_examples": "12", "max_eval_examples": "10", "batch_size": "6",
        "eval_batch_size": "5", "max_seq_len": "32", "bootstrap": "20"}
EXPECTED = {("sst2", "accuracy"), ("sst2", "train_seconds"), ("stsb", "pearson"), ("stsb", "spearmanr"),
            ("stsb", "train_seconds"), ("mrpc", "accuracy"), ("mrpc", "f1"), ("mrpc", "train_seconds")}


@pytest.fixture(scope="module")
def tiny_glue_rows(tmp_path_factory):
    results = tmp_path_factory.mktemp("glue_results")
    plan = RunPlan(models=["bert-scratch", "bert-hf", "gpt2-scratch"], tasks=["glue"], weights="random:tiny",
                   seed=0, results_dir=str(results), overrides={"glue": TINY})
    _, failures = run(plan)
    assert failures == []
    return load_results(str(results))


@pytest.mark.parametrize("model", ["bert-scratch", "bert-hf", "gpt2-scratch"])
def test_tiny_run_rows_are_well_formed(tiny_glue_rows, model):
    rows = tiny_glue_rows[tiny_glue_rows["model"] == model]
    assert set(zip(rows["subtask"], rows["metric"])) == EXPECTED
    for _, row in rows.iterrows():
        assert row["task"] == "glue" and row["task_version"] == Glue.version and math.isfinite(row["value"])
        if row["metric"] == "train_seconds":
            assert row["value"] > 0 and row["n"] == 12 and row["extra"]["steps"] == 2
            continue
        assert row["n"] == 10 and row["stderr"] >= 0 and row["higher_is_better"]
        assert row["extra"]["ci_low"] <= row["extra"]["ci_high"]


def test_tiny_run_report_section(tiny_glue_rows, tmp_path):
    section = TASKS.get("glue").report_section(tiny_glue_rows, tmp_path / "figures", tmp_path)
    assert "### GLUE summary: 12 train / 10 dev examples" in section
    assert "| mrpc | f1 |" in section and "88.9" in section  # BERT-base MRPC F1, Devlin et al. Table 1
    assert "| sst2 | accuracy |" in section and "91.5 |" in section  # MiniLM-L6xH384 dev, Wang et al. Table 8
    assert "bert-scratch (`random:tiny`)" in section and "| bert-hf | `random:tiny` | stsb | 12 | 1 |" in section
    assert "![GLUE 12 train / 10 dev examples](figures/glue_summary_12_train_10_dev_examples.png)" in section
    assert (tmp_path / "figures" / "glue_summary_12_train_10_dev_examples.png").stat().st_size > 0


def test_report_keeps_budgets_apart(tiny_glue_rows, tmp_path):
    """A full-data run and a small-budget run are two tables, not one table of whichever ran last."""
    full = tiny_glue_rows.copy()
    full["config"] = [{**c, "max_train_examples": None, "max_eval_examples": None} for c in full["config"]]
    full["value"] = 0.123  # no 10-example accuracy can be 12.3%
    full["created_at"] = "2000-01-01T00:00:00+00:00"  # older: must not hide behind the newer budget
    both = pd.concat([tiny_glue_rows, full], ignore_index=True).sort_values("created_at", kind="stable")
    section = TASKS.get("glue").report_section(both, None, None)
    full_part, small_part = section.split("### GLUE summary: 12 train / 10 dev examples")
    assert full_part.startswith("### GLUE summary: full train and dev sets")
    assert "| sst2 | accuracy | 12.3 [" in full_part and "12.3 [" not in small_part


@pytest.mark.parametrize(("config", "label"), [
    ({"max_train_examples": None, "max_eval_examples": None, "limit": None}, "full train and dev sets"),
    ({"max_train_examples": 3000, "max_eval_examples": 500, "limit": None}, "3,000 train / 500 dev examples"),
    ({"max_train_examples": None, "max_eval_examples": None, "limit": 64}, "64 train / 64 dev examples"),
    ({"max_train_examples": 3000, "max_eval_examples": None, "limit": None}, "3,000 train / all dev examples"),
])
def test_variant_names_the_data_budget(config, label):
    assert glue.variant(config) == label


def test_non_finite_loss_stops_and_names_the_step(tmp_path):
    plan = RunPlan(models=["bert-scratch"], tasks=["glue"], weights="random:tiny", results_dir=str(tmp_path),
                   overrides={"glue": {**TINY, "subtasks": "mrpc,sst2", "lr": "1e30"}})
    _, failures = run(plan)
    assert len(failures) == 1
    assert "glue mrpc: training loss is nan at step 2 of 2 (bert-scratch); lower glue.lr (now 1e+30)" in \
        failures[0].message


def test_qnli_is_skipped_with_a_warning_on_local_data(tiny_glue_rows):
    task = Glue(GlueConfig(subtasks=("qnli",)))
    with pytest.warns(UserWarning, match="skipping qnli: its train split is not vendored"):
        assert list(task.run(None, RunContext(0, None, "cpu", lambda m: None, lambda it, **_: it))) == []


@pytest.mark.slow
def test_default_minilm_run_learns_and_pairs_agree(tmp_path):
    """The documented default: `harness run --model bert-scratch,bert-hf --weights minilm --tasks glue`."""
    plan = RunPlan(models=["bert-scratch", "bert-hf"], tasks=["glue"], weights="minilm", results_dir=str(tmp_path))
    _, failures = run(plan)
    assert failures == []
    rows = load_results(str(tmp_path)).set_index(["model", "subtask", "metric"])
    for model in ("bert-scratch", "bert-hf"):
        assert rows.loc[(model, "sst2", "accuracy"), "value"] > 0.75  # majority class: 0.504
        assert rows.loc[(model, "mrpc", "accuracy"), "value"] > 0.70  # majority class: 0.684
        assert rows.loc[(model, "stsb", "pearson"), "value"] > 0.6  # measured: 0.75 (docs/glue.md)
    for sub, metric in [("sst2", "accuracy"), ("stsb", "pearson"), ("mrpc", "f1")]:
        ours, theirs = rows.loc[("bert-scratch", sub, metric)], rows.loc[("bert-hf", sub, metric)]
        assert abs(ours["value"] - theirs["value"]) <= 1.96 * math.hypot(ours["stderr"], theirs["stderr"])


def test_full_report_has_one_section_per_budget(tiny_glue_rows, tmp_path):
    from harness.report import write_report

    full = tiny_glue_rows[tiny_glue_rows["model"] == "bert-hf"].copy()
    full["config"] = [{**c, "max_train_examples": None, "max_eval_examples": None} for c in full["config"]]
    (tmp_path / "full" / "v1").mkdir(parents=True)
    full.to_json(tmp_path / "full" / "v1" / "full.jsonl", orient="records", lines=True)
    small = tiny_glue_rows[tiny_glue_rows["model"] == "bert-scratch"]
    (tmp_path / "small" / "v1").mkdir(parents=True)
    small.to_json(tmp_path / "small" / "v1" / "small.jsonl", orient="records", lines=True)
    report = write_report([str(tmp_path / "full"), str(tmp_path / "small")], str(tmp_path / "r" / "report.md"))
    text = report.read_text()
    assert "### weights `random:tiny`, full train and dev sets" in text
    assert "### weights `random:tiny`, 12 train / 10 dev examples" in text
    assert (tmp_path / "r" / "figures" / "glue_random_tiny_full_train_and_dev_sets.png").exists()
