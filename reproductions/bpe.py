"""Byte-level byte-pair encoding (BPE), written from the papers.

Sennrich, Haddow, Birch. "Neural Machine Translation of Rare Words with Subword
Units." ACL 2016 (arXiv:1508.07909): start from single symbols, count adjacent
pairs over a word-frequency table, merge the most frequent pair into a new
symbol, repeat; the ordered list of merges *is* the tokenizer, and a word is
encoded by replaying the merges in the order they were learned.

Radford, Wu, Child, Luan, Amodei, Sutskever. "Language Models are Unsupervised
Multitask Learners." 2019 (GPT-2), Sec. 2.2: run BPE on UTF-8 *bytes*, so a
base vocabulary of 256 covers every string, and first split the text with a
regex so merges never cross letter / digit / punctuation boundaries (except one
leading space).

What differs from the papers' descriptions, all as in GPT-2's released code:

* Bytes are shown as printable characters (`bytes_to_unicode`) so merges and
  vocabulary files are plain text: printable Latin-1 bytes stand for
  themselves, the other 68 (space, control bytes, ...) become U+0100 onwards;
  a space is "Ġ" (U+0120).
* Encoding a word replays merges by rank: repeatedly merge every occurrence of
  the adjacent pair that was learned first. Encodings of a pre-token are
  cached (`ByteBPE.cache`).
* "<|endoftext|>" is in the vocabulary but `encode` treats text as text: the
  string "<|endoftext|>" inside a text is split like any other (as the
  `tokenizers` reference does without added special tokens).

Training (`ByteBPE.train`) keeps pair counts incrementally: after a merge only
the words that contain the pair are re-counted, and a heap with lazy deletion
finds the next most frequent pair. Ties are broken deterministically: among
pairs of equal count, the smallest (left id, right id) wins, where bytes have
ids 0-255 in the order of their printable characters (GPT-2's order) and each
new token takes the next id. That is the rule of the `tokenizers` library's
`BpeTrainer` too, so both learn the same merges from the same word counts.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex

# GPT-2's pre-tokenizer: contractions, optional space + letters / digits / other symbols, whitespace runs
# (a run followed by a non-space keeps its last space for the next word).
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"
CACHE_LIMIT = 200_000  # pre-tokens whose encoding is remembered before the cache is emptied


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map; the dict's order is GPT-2's id order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def to_symbols(piece: str) -> str:
    """A pre-token as its UTF-8 bytes, each shown as GPT-2's printable character."""
    return "".join(BYTE_TO_CHAR[b] for b in piece.encode("utf-8"))


class ByteBPE:
    """encoder (token -> id) plus merges in rank order; tokens are strings of printable byte characters."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = dict(encoder)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.merges = list(merges)
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        self.cache: dict[str, list[int]] = {}
        missing = [a + b for a, b in self.merges if a + b not in self.encoder]
        if missing or any(c not in self.encoder for c in CHAR_TO_BYTE):
            raise ValueError(f"vocabulary lacks merged tokens {missing[:3]} or single bytes")

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> ByteBPE:
        """Load GPT-2's `encoder.json` (token -> id) and `vocab.bpe` (a version line, then a merge a line)."""
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(encoder, merges)

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Write GPT-2-format `encoder.json` and `vocab.bpe` (read by `from_gpt2_files` and `tokenizers`)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        encoder, vocab = out / "encoder.json", out / "vocab.bpe"
        encoder.write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        vocab.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8")
        return encoder, vocab

    # ---- encoding ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in GPT2_SPLIT.findall(text):
            ids.extend(self.encode_piece(piece))
        return ids

    def encode_piece(self, piece: str) -> list[int]:
        """One pre-token -> ids, through the cache."""
        ids = self.cache.get(piece)
        if ids is None:
            if len(self.cache) >= CACHE_LIMIT:
                self.cache.clear()
            ids = self.cache[piece] = [self.encoder[t] for t in self.bpe(to_symbols(piece))]
        return ids

    def bpe(self, symbols: str) -> list[str]:
        """Replay merges on one pre-token: merge every occurrence of the lowest-ranked pair, repeat."""
        parts = list(symbols)
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            parts = merge_pair(parts, best, best[0] + best[1])
        return parts

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; byte sequences that are not valid UTF-8 become U+FFFD, as in `tokenizers`."""
        try:
            chars = "".join(self.decoder[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary of {self.vocab_size}") from None
        return bytes(CHAR_TO_BYTE[c] for c in chars).decode("utf-8", errors="replace")

    # ---- training ---------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str | Iterable[str],
        vocab_size: int,
        special_tokens: tuple[str, ...] = (EOT,),
        min_frequency: int = 2,
    ) -> ByteBPE:
        """Learn merges until the vocabulary (256 bytes + merges + specials) has `vocab_size` tokens.

        `text` is one string or several (each is pre-tokenized on its own). Stops early when no pair
        occurs `min_frequency` times. Special tokens get the last ids.
        """
        n_tokens = vocab_size - len(special_tokens)
        if n_tokens < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(special_tokens)}, got {vocab_size}")
        words = count_words([text] if isinstance(text, str) else text)
        tokens = list(BYTE_TO_CHAR.values())  # id -> token; ids 0..255 are the bytes in GPT-2's order
        merges = learn_merges(words, tokens, n_tokens, min_frequency)
        encoder = {t: i for i, t in enumerate(tokens)}
        for special in special_tokens:
            encoder.setdefault(special, len(encoder))
        return cls(encoder, [(tokens[a], tokens[b]) for a, b in merges])


def merge_pair(parts: list, pair: tuple, new) -> list:
    """Replace each non-overlapping occurrence of `pair`, left to right, by `new`."""
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i] == pair[0] and parts[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def count_words(texts: Iterable[str]) -> Counter[tuple[int, ...]]:
    """Pre-token frequencies, each pre-token as a tuple of byte ids (GPT-2's byte order)."""
    byte_id = {b: i for i, b in enumerate(BYTE_TO_CHAR)}
    pieces: Counter[str] = Counter()
    for text in texts:
        pieces.update(GPT2_SPLIT.findall(text))
    return Counter({tuple(byte_id[b] for b in p.encode("utf-8")): n for p, n in pieces.items()})


class PairStats:
    """Pair counts over a word-frequency table, updated word by word as merges happen."""

    def __init__(self, words: Counter[tuple[int, ...]]):
        self.words = [list(w) for w in words]
        self.freqs = list(words.values())
        self.counts: dict[tuple[int, int], int] = defaultdict(int)
        self.where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that may hold it
        for i, word in enumerate(self.words):
            for pair in zip(word, word[1:]):
                self.counts[pair] += self.freqs[i]
                self.where[pair].add(i)
        self.heap = [(-n, a, b) for (a, b), n in self.counts.items()]  # max count, then smallest ids
        heapq.heapify(self.heap)

    def best(self) -> tuple[tuple[int, int], int] | None:
        """The most frequent pair and its count (lazy deletion: skip entries whose count is stale)."""
        while self.heap:
            neg, a, b = heapq.heappop(self.heap)
            if self.counts.get((a, b), 0) == -neg:
                return (a, b), -neg
        return None

    def merge(self, pair: tuple[int, int], new: int) -> None:
        """Merge `pair` into `new` in every word holding it; re-count only those words."""
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in self.where.pop(pair, ()):
            old, f = self.words[i], self.freqs[i]
            merged = merge_pair(old, pair, new)
            if len(merged) == len(old):
                continue  # stale entry: the pair left this word through an earlier merge
            for p in zip(old, old[1:]):
                delta[p] -= f
            for p in zip(merged, merged[1:]):
                delta[p] += f
                self.where[p].add(i)
            self.words[i] = merged
        for p, d in delta.items():
            if d:
                self.counts[p] += d
                if self.counts[p] > 0:
                    heapq.heappush(self.heap, (-self.counts[p], *p))
                else:
                    del self.counts[p]


def learn_merges(
    words: Counter[tuple[int, ...]], tokens: list[str], n_tokens: int, min_frequency: int
) -> list[tuple[int, int]]:
    """Sennrich et al.'s loop; appends new tokens to `tokens` and returns the merges as id pairs."""
    stats, ids = PairStats(words), {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[int, int]] = []
    while len(tokens) < n_tokens:
        found = stats.best()
        if found is None or found[1] < max(min_frequency, 1):
            break
        (a, b), _ = found
        new_token = tokens[a] + tokens[b]
        if new_token not in ids:  # two merge paths can spell the same string: keep one id
            ids[new_token] = len(tokens)
            tokens.append(new_token)
        merges.append((a, b))
        stats.merge((a, b), ids[new_token])
    return merges
