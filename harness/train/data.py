"""The training data as token ids: a named corpus (`tinyshakespeare`, `wikitext2`, read through
`harness.api.data`) or a UTF-8 file, split into train and validation as the package docstring states,
and the seeded random windows a batch is made of.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from harness.api import HarnessError
from harness.api.data import TINY_SHAKESPEARE, detokenize, load_wikitext_documents
from harness.api.tokenizer import TextTokenizer

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
            _ENCODED[key] = tokenizer.encode(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise HarnessError(f"--data {path}: cannot read it as UTF-8 text ({e})") from e
    return _ENCODED[key]


def _wikitext2(tokenizer: TextTokenizer) -> TokenData:
    def ids(split: str) -> torch.Tensor:
        key = (f"wikitext2:{split}", tokenizer.name)
        if key not in _ENCODED:
            docs = tokenizer.encode_batch([detokenize(d) for d in load_wikitext_documents(split)])
            _ENCODED[key] = [t for doc in docs for t in (*doc, tokenizer.eot_id)]
        return torch.tensor(_ENCODED[key], dtype=torch.long)

    return TokenData(ids("valid"), ids("test"), "wikitext2 (raw valid trains, raw test validates)")


def check_data(data: TokenData, block_size: int) -> None:
    """Both splits must hold at least one window of block_size + 1 tokens (inputs and shifted targets)."""
    for name, ids in (("train", data.train), ("validation", data.val)):
        if len(ids) <= block_size + 1:
            raise HarnessError(
                f"the {name} split has {len(ids)} tokens, too few for block_size "
                f"{block_size}; use more text or a smaller --block-size"
            )


def sample_batch(ids: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """(x, y), each (B, T): random windows of ids and the same windows shifted by one token."""
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x, y
