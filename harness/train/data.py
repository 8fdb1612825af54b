"""The training data as token ids: a named corpus (`tinyshakespeare`, `wikitext2`, read through
`harness.api.data`) or a UTF-8 file, split into train and validation as the package docstring states,
and the seeded random windows a batch is made of.

Tokenising a corpus takes seconds (Tiny Shakespeare: ~1 s, WikiText-2's two splits: more), so the ids
are cached on disk under `harness.api.weights.cache_root()/tokens/`, keyed by the SHA-256 of the
tokenizer's serialisation and of the exact text: a changed file or tokenizer is tokenised afresh.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from harness.api import HarnessError
from harness.api.data import TINY_SHAKESPEARE, detokenize, load_wikitext_documents
from harness.api.tokenizer import TextTokenizer
from harness.api.weights import cache_root

TRAIN_FRACTION = 0.9  # of a single text's tokens; the rest validates
_ENCODED: dict[tuple[str, str], list[int]] = {}  # (what, tokenizer name) -> ids: tests reuse them


@dataclass(frozen=True)
class TokenData:
    train: torch.Tensor  # 1-D int64 token ids
    val: torch.Tensor
    description: str


def load_data(spec: str, tokenizer: TextTokenizer) -> TokenData:
    """Token ids of a named corpus or a UTF-8 file, split as the package docstring states."""
    if spec == "wikitext2":
        return _wikitext2(tokenizer)
    path = TINY_SHAKESPEARE if spec == "tinyshakespeare" else Path(spec)
    if not path.is_file():
        raise HarnessError(f"--data {spec!r}: not tinyshakespeare, wikitext2 or an existing text file")
    ids = torch.tensor(_encode_file(str(path), tokenizer), dtype=torch.long)
    cut = int(TRAIN_FRACTION * len(ids))
    return TokenData(ids[:cut], ids[cut:], f"{spec} (first 90% of tokens train, last 10% validate)")


def _encode_file(path: str, tokenizer: TextTokenizer) -> list[int]:
    key = (str(Path(path).resolve()), tokenizer.name)
    if key not in _ENCODED:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise HarnessError(f"--data {path}: cannot read it as UTF-8 text ({e})") from e
        _ENCODED[key] = cached_ids(text, tokenizer, lambda: tokenizer.encode(text))
    return _ENCODED[key]


def _wikitext2(tokenizer: TextTokenizer) -> TokenData:
    def ids(split: str) -> torch.Tensor:
        key = (f"wikitext2:{split}", tokenizer.name)
        if key not in _ENCODED:
            docs = [detokenize(d) for d in load_wikitext_documents(split)]

            def encode() -> list[int]:
                return [t for doc in tokenizer.encode_batch(docs) for t in (*doc, tokenizer.eot_id)]

            _ENCODED[key] = cached_ids("\x00<|doc|>".join(docs) + "\x00<|eot|>", tokenizer, encode)
        return torch.tensor(_ENCODED[key], dtype=torch.long)

    return TokenData(ids("valid"), ids("test"), "wikitext2 (raw valid trains, raw test validates)")


def cached_ids(text: str, tokenizer: TextTokenizer, encode) -> list[int]:
    """encode()'s ids for `text`, read from the on-disk cache when this tokenizer has seen this text.
    The file is written under a temporary name and renamed, so concurrent ranks never read half a file."""
    digest = hashlib.sha256(f"{_tokenizer_sha256(tokenizer)}\n".encode() + text.encode("utf-8")).hexdigest()
    path = cache_root() / "tokens" / f"{digest[:32]}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True).tolist()
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass
    ids = encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(torch.tensor(ids, dtype=torch.int32), tmp)
        os.replace(tmp, path)
    except OSError:  # a read-only cache costs time, not correctness
        pass
    return ids


@lru_cache(maxsize=8)
def _tokenizer_fingerprint(serialised: str) -> str:
    return hashlib.sha256(serialised.encode("utf-8")).hexdigest()


def _tokenizer_sha256(tokenizer: TextTokenizer) -> str:
    return _tokenizer_fingerprint(tokenizer.backend.to_str())


def check_data(data: TokenData, block_size: int) -> None:
    """Both splits must hold at least one window of block_size + 1 tokens (inputs and shifted targets)."""
    for name, ids in (("train", data.train), ("validation", data.val)):
        if len(ids) <= block_size + 1:
            raise HarnessError(
                f"the {name} split has {len(ids)} tokens, too few for block_size "
                f"{block_size}; use more text or a smaller --block-size"
            )


def sample_batch(
    ids: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator, rows: slice = slice(None)
):
    """(x, y), each (B, T): random windows of ids and the same windows shifted by one token. `rows`
    keeps a share of the batch (a rank's, under torchrun): the generator draws all `batch_size` offsets
    either way, so every rank, and a single process, consumes the same random stream."""
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)[rows]
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x, y
