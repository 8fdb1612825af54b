"""Datasets for the offline lm-eval tasks in this folder (`--include-path tasks/lm_eval`).

lm-eval calls these through `custom_dataset: !function harness_data.NAME` in the YAML files next to
this one, so nothing is downloaded and no path depends on the working directory. Every row comes
from the vendored files in `tasks/data/` (sources, commits and checksums: tasks/data/README.md):

- `sst2`: GLUE SST-2 (Socher et al. 2013) as lm-eval's `sst2` task reads it: `validation` is the
  872-row dev set, `train` the first 1000 rows of the train set (the few-shot pool);
- `wikitext`: the WikiText-2 raw test and validation files (Merity et al. 2016) cut into articles at
  their top-level headings, one `page` per article, as lm-eval's `wikitext` task sees
  `EleutherAI/wikitext_document_level` (the same split `harness run --tasks ppl` scores).
"""

from __future__ import annotations

import csv
from pathlib import Path

import datasets

# lm-eval's own wikitext preprocessing, so `harness_wikitext` is its `wikitext` task on local files.
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401

from harness.api.data import DATA_DIR, load_wikitext_documents

SST2_FEWSHOT_ROWS = 1000  # the few-shot pool: enough for any --num-fewshot, quick to build


def _glue_rows(path: Path) -> list[dict[str, str]]:
    """A GLUE TSV with quoting disabled (the default quoting merges rows; see tasks/data/README.md)."""
    with open(path, encoding="utf-8", newline="") as f:
        header, *rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    return [dict(zip(header, row)) for row in rows]


def _sst2_split(name: str, limit: int | None = None) -> datasets.Dataset:
    rows = _glue_rows(DATA_DIR / "glue" / "SST-2" / f"{name}.tsv")[:limit]
    return datasets.Dataset.from_dict({"sentence": [r["sentence"] for r in rows],
                                       "label": [int(r["label"]) for r in rows]})


def sst2(**_: object) -> datasets.DatasetDict:
    """SST-2 dev (validation) and the few-shot pool (train); lm-eval passes metadata as keywords."""
    return datasets.DatasetDict({"train": _sst2_split("train", SST2_FEWSHOT_ROWS),
                                 "validation": _sst2_split("dev")})


def wikitext(**_: object) -> datasets.DatasetDict:
    """WikiText-2 raw articles: `test` (62) and `validation` (60), each row {"page": article}."""
    return datasets.DatasetDict({split: datasets.Dataset.from_dict({"page": load_wikitext_documents(raw)})
                                 for split, raw in (("test", "test"), ("validation", "valid"))})
