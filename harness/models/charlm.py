"""Models that a task trains from scratch: the character-level ladder and the autograd fitters.

The ladder (reproductions/charlm.py, reproductions/gpt2.py) climbs one idea at a time:

    bigram, trigram      counting n-grams with add-k smoothing (Shannon 1948; Chen & Goodman 1999)
    mlp-ngram            Bengio, Ducharme, Vincent & Jauvin 2003, a neural n-gram
    rnn, lstm, gru       Elman 1990; Hochreiter & Schmidhuber 1997; Cho et al. 2014
    char-gpt-scratch     our GPT-2 (Radford et al. 2019) at a tiny character-level size
    char-gpt-hf          transformers.GPT2LMHeadModel at the same size, started from a copy of the
                         scratch model's initial weights and trained with the identical recipe

Nothing is loaded: `--weights random[:SIZE]` only picks the hyper-parameters (`tiny`, the default,
or `small`); a task asks the adapter for a fresh model with `new_lm(vocab_size, seq_len, seed)`
and trains it with `train(lm, data, recipe)`:

    lm = model.new_lm(vocab_size=4, seq_len=32, seed=0)             # a reproductions.charlm.CharLM
    losses = model.train(lm, rows, Recipe(steps=300, batch_size=32, block=32, lr=3e-3, seed=0))
    lm.sample(8, 32, generator=torch.Generator().manual_seed(0))    # (8, 32) symbols

The same trick registers `autograd-scratch` (our scalar engine), `autograd-torch` (torch tensors
and autograd with hand-written SGD/Adam updates) and `autograd-torch-nn` (nn.Linear plus
torch.optim): the three methods of reproductions/autograd_experiments.py.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from tokenizers import Tokenizer, models
from torch import nn

from harness.api import MODELS, ArchSpec, Capability, HarnessError, ModelAdapter, ModelInfo, ModelSpec, Recipe, Weights
from harness.api.tokenizer import TextTokenizer
from reproductions import autograd_experiments as ax
from reproductions import charlm, gpt2

TRAINED_BY_TASK = "only --weights random[:SIZE] applies: this model is trained from scratch by its task"


# ---- weights: nothing to load --------------------------------------------------------------------
class Untrained(nn.Module):
    """Stands where a checkpoint class would: `random` builds it (no tensors), nothing loads it."""

    def __init__(self, config: object = None) -> None:
        super().__init__()

    @classmethod
    def from_pretrained(cls, where: str, **kwargs: Any) -> None:
        raise ValueError(TRAINED_BY_TASK)  # load_weights turns this into a one-line HarnessError


@dataclass(frozen=True)
class Size:
    """What `random:SIZE` resolves to: the named hyper-parameters of one model family."""

    family: str
    name: str
    hyper: tuple[tuple[str, Any], ...]  # (field, value) pairs, kept hashable

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.hyper)


class TaskSymbols(TextTokenizer):
    """A placeholder: the task owns the vocabulary (rule symbols, Shakespeare's characters), so
    anything that tries to tokenize text for these models (`harness train`, `ppl`) is told so."""

    def encode(self, text: str) -> list[int]:
        raise HarnessError("this model has no tokenizer: it is trained from scratch by its task "
                           "(ngram-rules, char-ppl, autograd-fit), not by harness train or text tasks")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


@lru_cache(maxsize=1)
def symbol_tokenizer() -> TextTokenizer:
    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0}, unk_token="<unk>"))
    return TaskSymbols(backend=backend, eot_id=0, pad_id=0, name="none (the task defines the symbols)")


def trained_arch(name: str, sizes: dict[str, dict[str, Any]]) -> ArchSpec:
    def random_config(size: str, tokenizer: TextTokenizer) -> Size:
        return Size(name, size, tuple(sorted(sizes[size].items())))

    return ArchSpec(name=name, hf_model_class=Untrained, random_config=random_config,
                    sizes=lambda: list(sizes), tokenizer=symbol_tokenizer, default_weights="random",
                    aliases={}, default_size="tiny")


# ---- the ladder ----------------------------------------------------------------------------------
class ScratchCharGPT(charlm.CharLM):
    """reproductions/gpt2.py behind the CharLM interface."""

    def __init__(self, config: gpt2.GPT2Config) -> None:
        super().__init__()
        self.vocab = config.vocab_size
        self.gpt = gpt2.GPT2(config)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """Causal attention probabilities (n_layer, B, n_head, T, T), recomputed from each block's
        fused q/k projection (the forward pass itself uses fused SDPA, which returns no weights)."""
        qk: list[torch.Tensor] = []
        hooks = [block.attn.c_attn.register_forward_hook(lambda _m, _i, out: qk.append(out))
                 for block in self.gpt.transformer.h]
        try:
            self.gpt(idx)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack([self._probs(out) for out in qk])

    def _probs(self, qkv: torch.Tensor) -> torch.Tensor:
        B, T, C3 = qkv.shape
        nh = self.gpt.config.n_head
        q, k, _ = (t.view(B, T, nh, -1).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))  # (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)


class HFCharGPT(charlm.CharLM):
    """transformers.GPT2LMHeadModel behind the CharLM interface, holding a copy of the scratch init."""

    def __init__(self, scratch: ScratchCharGPT) -> None:
        super().__init__()
        import transformers

        hf_class = getattr(transformers, gpt2.HF_CLASS)  # transformers.GPT2LMHeadModel
        self.vocab = scratch.vocab
        self.hf = hf_class(hf_class.config_class(**scratch.gpt.config.to_hf_kwargs()))
        self.hf.load_state_dict(scratch.gpt.to_hf_state_dict(), strict=True)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx).logits


def _counts(vocab: int, seq_len: int, hyper: dict) -> charlm.CharLM:
    return charlm.NGramCounts(charlm.NGramConfig(vocab=vocab, **hyper))


def _mlp(vocab: int, seq_len: int, hyper: dict) -> charlm.CharLM:
    return charlm.NeuralNGram(charlm.NeuralNGramConfig(vocab=vocab, **hyper))


def _rnn(vocab: int, seq_len: int, hyper: dict) -> charlm.CharLM:
    return charlm.RNNLM(charlm.RNNConfig(vocab=vocab, **hyper))


def _gpt(vocab: int, seq_len: int, hyper: dict) -> charlm.CharLM:
    return ScratchCharGPT(gpt2.GPT2Config.from_name("tiny", vocab_size=vocab, block_size=seq_len, **hyper))


def _gpt_hf(vocab: int, seq_len: int, hyper: dict) -> charlm.CharLM:
    return HFCharGPT(_gpt(vocab, seq_len, hyper))  # one seeded init, copied: identical start


@dataclass(frozen=True)
class Rung:
    name: str  # registry name
    arch: str  # family shared by a scratch model and its reference (weights are cached per arch)
    paper: str
    make: Callable[[int, int, dict], charlm.CharLM]  # (vocab, seq_len, hyper-parameters) -> model
    sizes: dict[str, dict[str, Any]]  # random:SIZE -> hyper-parameters
    impl: str = "scratch"
    reference: str | None = None
    max_length: int = sys.maxsize  # longest sequence the model accepts


_GPT_SIZES = {"tiny": {}, "small": dict(n_layer=4, n_head=4, n_embd=128)}  # over gpt2.name_to_config["tiny"]


def _rnn_sizes(cell: str) -> dict[str, dict[str, Any]]:
    return {"tiny": dict(cell=cell, n_embd=32, n_hidden=128), "small": dict(cell=cell, n_embd=64, n_hidden=256)}


RUNGS: tuple[Rung, ...] = (
    Rung("bigram", "bigram", "counting bigram, add-k (Shannon 1948)", _counts,
         {"tiny": dict(order=2, add_k=0.01), "small": dict(order=2, add_k=0.01)}),
    Rung("trigram", "trigram", "counting trigram, add-k (Shannon 1948)", _counts,
         {"tiny": dict(order=3, add_k=0.01), "small": dict(order=3, add_k=0.01)}),
    Rung("mlp-ngram", "mlp-ngram", "neural n-gram MLP (Bengio et al. 2003)", _mlp,
         {"tiny": dict(context=3, n_embd=16, n_hidden=128), "small": dict(context=8, n_embd=24, n_hidden=256)}),
    Rung("rnn", "rnn", "Elman RNN (Elman 1990)", _rnn, _rnn_sizes("rnn")),
    Rung("lstm", "lstm", "LSTM (Hochreiter & Schmidhuber 1997)", _rnn, _rnn_sizes("lstm")),
    Rung("gru", "gru", "GRU (Cho et al. 2014)", _rnn, _rnn_sizes("gru")),
    Rung("char-gpt-scratch", "char-gpt", "character-level GPT-2 (reproductions/gpt2.py)", _gpt, _GPT_SIZES,
         reference="char-gpt-hf", max_length=1024),
    Rung("char-gpt-hf", "char-gpt", "reference: transformers.GPT2LMHeadModel, character level, scratch init",
         _gpt_hf, _GPT_SIZES, impl="hf", max_length=1024),
)


class LadderModel(ModelAdapter):
    """A family of trainable language models; `new_lm` hands out a fresh, seeded one."""

    capabilities = frozenset({Capability.LADDER})

    def __init__(self, info: ModelInfo, rung: Rung, weights: Weights, device: str) -> None:
        super().__init__(info, nn.Module(), weights.tokenizer, weights, device)
        self.rung = rung
        self.size: Size = weights.hf_config

    @property
    def max_length(self) -> int:
        return self.rung.max_length

    def new_lm(self, vocab_size: int, seq_len: int, seed: int) -> charlm.CharLM:
        """A fresh model over `vocab_size` symbols for sequences of up to `seq_len`, initialised from
        `seed` alone (the global RNG is left as it was)."""
        if seq_len > self.max_length:
            raise HarnessError(f"{self.name} takes at most {self.max_length} tokens; lower seq_len={seq_len}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.rung.make(vocab_size, seq_len, self.size.kwargs).to(self.device)

    def train(self, lm: charlm.CharLM, data: torch.Tensor, recipe: Recipe) -> list[float]:
        """Fit `lm` on rows (N, T) or one stream (S,) of symbols; the loss of every step (none for counts)."""
        data = data.to(self.device)
        if isinstance(lm, charlm.NGramCounts):
            lm.fit(data)
            return []
        batches = charlm.row_batches(data, recipe.batch_size) if data.dim() == 2 else \
            charlm.window_batches(data, recipe.batch_size, recipe.block)
        return charlm.train_lm(lm, batches, recipe.steps, lr=recipe.lr, grad_clip=recipe.grad_clip,
                               seed=recipe.seed, schedule=recipe.schedule)


def _register_rung(rung: Rung) -> None:
    info = ModelInfo(rung.name, rung.arch, rung.impl, rung.reference)
    spec = ModelSpec(info, trained_arch(rung.arch, rung.sizes), lambda w, d: LadderModel(info, rung, w, d))
    MODELS.add(rung.name, f"{rung.paper}; trained by its task (ngram-rules, char-ppl)", spec)


for _rung in RUNGS:
    _register_rung(_rung)


# ---- autograd ------------------------------------------------------------------------------------
Fitter = Callable[[ax.Data, str, int], tuple[list[float], list[float]]]  # (data, optimizer, steps)


class AutogradModel(ModelAdapter):
    """One way of fitting a regression by gradient descent (reproductions/autograd_experiments.py)."""

    capabilities = frozenset({Capability.FIT})

    def __init__(self, info: ModelInfo, method: str, weights: Weights, device: str) -> None:
        super().__init__(info, nn.Module(), weights.tokenizer, weights, device)
        self.method = method

    @property
    def max_length(self) -> int:
        return 0  # reads no text

    def fit(self, data: ax.Data, optimizer: str, steps: int) -> tuple[list[float], list[float]]:
        """(final parameters: weights then bias, loss before every update)."""
        return ax.FITTERS[self.method](data, optimizer, steps)


AUTOGRAD_ARCH = trained_arch("autograd", {"tiny": {}})
AUTOGRAD_MODELS = (  # (name, method, impl, reference, description)
    ("autograd-scratch", "ours", "scratch", "autograd-torch",
     "scalar reverse-mode autograd + SGD/Adam, from scratch (reproductions/autograd.py)"),
    ("autograd-torch", "torch-raw", "hf", None, "reference: torch.autograd with hand-written SGD/Adam updates"),
    ("autograd-torch-nn", "torch-nn", "hf", None, "reference: torch.nn.Linear + torch.optim.SGD/Adam"),
)


def _register_autograd(name: str, method: str, impl: str, reference: str | None, description: str) -> None:
    info = ModelInfo(name, "autograd", impl, reference)
    MODELS.add(name, description, ModelSpec(info, AUTOGRAD_ARCH, lambda w, d: AutogradModel(info, method, w, d)))


for _entry in AUTOGRAD_MODELS:
    _register_autograd(*_entry)
