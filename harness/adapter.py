"""The model adapter: the one interface every model (scratch or reference) is wrapped behind.

Capabilities are declared, not faked: a task asks for what it needs with
`model.require(Capability.SCORE, task="ppl")`, and a model that cannot do it
fails with a one-line error instead of returning made-up numbers.

Worked example (what the `ppl` task does, in miniature)::

    model = build_model("gpt2-scratch", weights="random:tiny", device="cpu", seed=0)
    ids = model.tokenizer.encode("Hello world")               # [15496, 995]
    x = torch.tensor([[model.tokenizer.eot_id] + ids[:-1]])   # inputs
    y = torch.tensor([ids])                                    # next-token targets
    model.token_logprobs(x, y)                                 # (1, 2) log p(y_t | x_<=t)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from harness.errors import HarnessError

if TYPE_CHECKING:
    from collections.abc import Callable

    from harness.tokenizer import TextTokenizer
    from harness.weights import ArchSpec, Weights


class Capability(str, Enum):
    SCORE = "score"  # per-token log-probabilities: rolling log-likelihood, perplexity
    LOGITS = "logits"  # raw logits and gradients in the reference's layout: output parity
    GENERATE = "generate"  # autoregressive decoding
    CLASSIFY = "classify"  # a sequence-classification head that can be fine-tuned
    TRAIN = "train"  # next-token training
    SEQ2SEQ = "seq2seq"  # encoder-decoder: teacher-forced logits and batched greedy decoding of a source
    TOKENIZE = "tokenize"  # a text tokenizer: encode/decode batches and train new merges


@dataclass(frozen=True)
class ModelInfo:
    name: str  # registry name, e.g. "gpt2-scratch"
    arch: str  # architecture family shared by a scratch model and its reference, e.g. "gpt2"
    impl: str  # "scratch" (our reproduction) or "hf" (the transformers reference)
    reference: str | None  # registry name of the reference model, for scratch models


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: what the model is and how to build it from resolved weights."""

    info: ModelInfo
    arch: ArchSpec
    build: Callable[[Weights, str], ModelAdapter]  # (weights, device) -> adapter


class ModelAdapter(ABC):
    """A loaded model with its tokenizer, on a device. Subclasses implement what they declare."""

    capabilities: frozenset[Capability] = frozenset()

    def __init__(
        self, info: ModelInfo, module: torch.nn.Module, tokenizer: TextTokenizer, weights: Weights, device: str
    ) -> None:
        self.info = info
        self.module = module.to(device).eval()
        self.tokenizer = tokenizer
        self.weights = weights
        self.device = torch.device(device)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Longest input (in tokens) the model accepts."""

    def require(self, capability: Capability, task: str) -> None:
        if capability not in self.capabilities:
            have = ", ".join(sorted(c.value for c in self.capabilities)) or "nothing"
            raise HarnessError(
                f"model '{self.name}' cannot '{capability.value}', which task '{task}' needs (it can: {have})"
            )

    # -- LOGITS / SCORE ---------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, T, V) for input_ids (B, T); right padding is masked by attention_mask."""
        raise HarnessError(f"model '{self.name}' does not expose logits")

    @torch.no_grad()
    def token_logprobs(
        self, input_ids: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(targets[b, t] | input_ids[b, :t+1]) as float32 (B, T)."""
        mask = None if attention_mask is None else attention_mask.to(self.device)
        logits = self.logits(input_ids.to(self.device), mask)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        return logprobs.gather(-1, targets.to(self.device).unsqueeze(-1)).squeeze(-1)

    def reference_layout(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map tensors keyed by this module's parameter names (weights or their gradients) to the
        reference implementation's names and layouts, so parity can compare them one to one."""
        return tensors

    # -- GENERATE ---------------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> list[int]:
        """New token ids after the prompt (greedy at temperature 0; seeded sampling otherwise)."""
        raise HarnessError(f"model '{self.name}' does not generate")
