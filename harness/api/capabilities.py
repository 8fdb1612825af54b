"""What a model can do, declared rather than probed.

An adapter lists its `capabilities`; a task asks for the typed view it needs:

    scorer = model.require(Scorer, task="ppl")      # fails in one line if the model cannot score
    scorer.token_logprobs(x, y)                      # typed: Scorer's methods only

Each protocol below names one `Capability` and the methods an adapter that declares it provides.
Tasks never check `isinstance` against a concrete adapter, `hasattr`, or `info.impl`.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from harness.api.tokenizer import TextTokenizer
    from harness.api.weights import Weights


class Capability(str, Enum):
    SCORE = "score"  # per-token log-probabilities: rolling log-likelihood, perplexity
    LOGITS = "logits"  # raw logits and gradients in the reference's layout: output parity
    ENCODE = "encode"  # an encoder's last hidden states: parity for models without an LM head
    GENERATE = "generate"  # autoregressive decoding
    CLASSIFY = "classify"  # a sequence-classification head that can be fine-tuned
    TRAIN = "train"  # next-token training of the module (harness train, training throughput)
    SEQ2SEQ = "seq2seq"  # encoder-decoder: teacher-forced logits and batched greedy decoding of a source
    TOKENIZE = "tokenize"  # a text tokenizer: encode/decode batches and train new merges
    LADDER = "ladder"  # hands out fresh small LMs over a task's own symbols and trains them (ngram-rules)
    FIT = "fit"  # fits a regression by gradient descent (autograd-fit)
    CAUSAL_LM = "causal-lm"  # a decoder-only LM whose forward, decoding and training can be timed (throughput)
    RL_LOSS = "rl-loss"  # RL fine-tuning of a small policy: an algorithm's loss on rollouts (rl-rules, parity)


class _Model(Protocol):
    name: str
    device: torch.device
    tokenizer: TextTokenizer
    weights: Weights
    module: nn.Module

    @property
    def max_length(self) -> int: ...


class Scorer(_Model, Protocol):
    capability: ClassVar[Capability] = Capability.SCORE

    def token_logprobs(self, input_ids: Tensor, targets: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """log p(targets[b, t] | input_ids[b, :t+1]) as float32 (B, T)."""


class Logits(_Model, Protocol):
    capability: ClassVar[Capability] = Capability.LOGITS

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits (B, T, V); right padding is masked by attention_mask."""

    def reference_layout(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tensors keyed by this module's names (weights or grads) -> the reference's names and layouts."""


class Encoder(_Model, Protocol):
    capability: ClassVar[Capability] = Capability.ENCODE

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Last hidden state (B, T, H); padding keys (attention_mask 0) are masked."""


class Generator(_Model, Protocol):
    capability: ClassVar[Capability] = Capability.GENERATE

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> list[int]:
        """New token ids after the prompt (greedy at temperature 0; seeded sampling otherwise)."""


class Classifier(_Model, Protocol):
    capability: ClassVar[Capability] = Capability.CLASSIFY

    def encode_pairs(self, texts_a: list[str], texts_b: list[str] | None, max_len: int) -> dict[str, Tensor]:
        """Tokenized, truncated, right-padded sentence (pairs): the keyword arguments of `classifier(...)`."""

    def classifier(self, num_labels: int, seed: int) -> nn.Module:
        """A fresh trainable classifier on these weights: `module(**encode_pairs(...))` -> (B, num_labels)."""


class Trainable(_Model, Protocol):
    capability: ClassVar[Capability] = Capability.TRAIN

    def forward(self, module: nn.Module, input_ids: Tensor) -> Tensor:
        """Logits (B, T, V) of `module` (this adapter's module or a copy of it) on every position, no cache."""


class CausalLM(Trainable, Generator, Logits, Protocol):
    capability: ClassVar[Capability] = Capability.CAUSAL_LM

    def generate_batch(self, idx: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy decoding of a batch (B, T) -> (B, T + max_new_tokens), KV cache on, never stopping early."""

    def sample_batch(self, idx: Tensor, max_new_tokens: int, temperature: float, seed: int,
                     allowed: list[int] | None = None, module: nn.Module | None = None) -> Tensor:
        """Seeded sampling of a batch (B, T) -> (B, T + max_new_tokens), never stopping early (greedy at
        temperature 0); `allowed`: the only token ids it may pick, renormalised over them; `module`: this
        adapter's module (default) or a copy of it, e.g. a fine-tuned one."""


class Seq2Seq(_Model, Protocol):
    capability: ClassVar[Capability] = Capability.SEQ2SEQ
    bos_id: int
    eos_id: int

    def seq2seq_logits(self, src: Tensor, src_mask: Tensor | None, tgt_in: Tensor) -> Tensor:
        """src (B, S) with src_mask (B, S), decoder input tgt_in (B, T) starting with <s> -> (B, T, V)."""

    def greedy_batch(self, sources: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy targets for a batch of sources, each cut before its first </s>."""


class Tokenize(_Model, Protocol):
    capability: ClassVar[Capability] = Capability.TOKENIZE

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def train_bpe(self, lines: list[str], vocab_size: int, min_frequency: int = 2) -> Any: ...


class Ladder(_Model, Protocol):
    capability: ClassVar[Capability] = Capability.LADDER

    def new_lm(self, vocab_size: int, seq_len: int, seed: int) -> Any:
        """A fresh, seeded `reproductions.charlm.CharLM` over `vocab_size` symbols."""

    def train(self, lm: Any, data: Tensor, recipe: Any) -> list[float]:
        """Fit `lm` on rows (N, T) or one stream (S,) of symbols with a `harness.api.Recipe`; step losses."""


class Fitter(_Model, Protocol):
    capability: ClassVar[Capability] = Capability.FIT

    def fit(self, data: Any, optimizer: str, steps: int) -> tuple[list[float], list[float]]:
        """(final parameters: weights then bias, loss before every update)."""


class RLSession(Protocol):
    """One RL fine-tuning run of a policy (harness/models/rl.py): what `RLLoss.rl_session` returns."""

    policy: nn.Module  # a reproductions.charlm.CharLM: `logits(idx)`, `sample(...)`; the one being trained
    reference: nn.Module  # the frozen policy it started from (the KL's reference)

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates (the policy, and a value head where the algorithm has one)."""

    def prepare(self, batch: Any) -> Any:
        """Score a `reproductions.rl.Rollout` (or `Preferences`, for DPO) once, at sampling time: old and
        reference log-probabilities, advantages."""

    def loss(self, prepared: Any) -> Tensor:
        """The algorithm's loss on a prepared batch, differentiable in `parameters()`."""

    def reference_grads(self) -> dict[str, Tensor]:
        """The policy's current gradients in the reference's (transformers') names and layouts."""


class RLLoss(_Model, Protocol):
    capability: ClassVar[Capability] = Capability.RL_LOSS
    algorithm: str  # "grpo", "rloo", "dpo" or "ppo"

    def new_policy(self, vocab_size: int, seq_len: int, seed: int) -> Any:
        """A fresh, seeded char GPT (`reproductions.charlm.CharLM`); a scratch/TRL pair gets the same one."""

    def pretrain(self, lm: Any, data: Tensor, recipe: Any) -> list[float]:
        """Next-token training of `lm` on rows (N, T) of symbols with a `harness.api.Recipe`; step losses."""

    def rl_session(self, policy: Any, config: Any, group_size: int) -> RLSession:
        """RL fine-tuning of a copy of `policy` (also the reference) with an algorithm config of
        `reproductions.rl` (GRPOConfig, RLOOConfig, DPOConfig or PPOConfig)."""


PROTOCOLS: dict[Capability, type] = {
    p.capability: p for p in (Scorer, Logits, Encoder, Generator, Classifier, Trainable, CausalLM, Seq2Seq,
                              Tokenize, Ladder, Fitter, RLLoss)
}
