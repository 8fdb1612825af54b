"""The model adapter: the one interface every model (scratch, reference or a user's) is wrapped behind.

Capabilities are declared, not faked: a task asks for the typed view it needs with
`model.require(Scorer, task="ppl")` (see `harness.api.capabilities`), and a model that cannot do it
fails with a one-line error instead of returning made-up numbers.

Worked example (what the `ppl` task does, in miniature)::

    model = MODELS.get("gpt2-scratch").build(load_weights(arch, "random:tiny", seed=0), "cpu")
    scorer = model.require(Scorer, task="ppl")
    ids = scorer.tokenizer.encode("Hello world")               # [15496, 995]
    x = torch.tensor([[scorer.tokenizer.eot_id] + ids[:-1]])   # inputs
    y = torch.tensor([ids])                                     # next-token targets
    scorer.token_logprobs(x, y)                                 # (1, 2) log p(y_t | x_<=t)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F

from harness.api.capabilities import Capability
from harness.api.errors import HarnessError, first_line

if TYPE_CHECKING:
    from harness.api.tokenizer import TextTokenizer
    from harness.api.weights import ArchSpec, Weights

C = TypeVar("C")


@dataclass(frozen=True)
class ModelInfo:
    name: str  # registry name, e.g. "gpt2-scratch"
    arch: str  # architecture family shared by a scratch model and its reference, e.g. "gpt2"
    impl: str  # "scratch" (a reproduction) or "hf" (the reference), for display and ordering only
    reference: str | None  # registry name of the reference model, for scratch models


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: what the model is and how to build it from resolved weights."""

    info: ModelInfo
    arch: ArchSpec
    factory: Callable[[Weights, str], ModelAdapter]  # (weights, device) -> adapter

    def build(self, weights: Weights, device: str) -> ModelAdapter:
        """The adapter on `device`. A reproduction that refuses the weights (a `ValueError`, e.g. a
        checkpoint that does not fit or a config feature it does not implement), a config that lacks a
        field the reproduction reads (`AttributeError`) or weights that do not fit the module (torch's
        `RuntimeError` from `load_state_dict`) become one line here, the one place every command
        builds models through."""
        try:
            return self.factory(weights, device)
        except (ValueError, RuntimeError, AttributeError) as e:
            raise HarnessError(f"{self.info.name} cannot load weights '{weights.identity}': {first_line(e)}") from e


def check_device(device: str) -> None:
    """Refuse, in one line and before any weights load, a device that is not `cpu`, `cuda` or `cuda:N`,
    or one this machine does not have."""
    kind, colon, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):
        raise HarnessError(f"--device {device!r}: expected cpu, cuda or cuda:N (e.g. cuda:0)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if kind == "cuda" and colon and int(index) >= torch.cuda.device_count():
        raise HarnessError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                           f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")


class ModelAdapter(ABC):
    """A loaded model with its tokenizer, on a device. Subclasses implement what they declare in
    `capabilities`; the methods below are the defaults for capabilities that have one."""

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

    def can(self, need: type | Capability) -> bool:
        return _capability(need) in self.capabilities

    def require(self, need: type[C] | Capability, task: str) -> C:
        """This model as the typed view `need` (a protocol of harness.api.capabilities), or a one-line
        error naming what the model can do instead."""
        if not self.can(need):
            have = ", ".join(sorted(c.value for c in self.capabilities)) or "nothing"
            raise HarnessError(f"model '{self.name}' cannot '{_capability(need).value}', which '{task}' needs "
                               f"(it can: {have})")
        return self  # type: ignore[return-value]

    # -- LOGITS / SCORE ---------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise HarnessError(f"model '{self.name}' does not expose logits")

    @torch.no_grad()
    def token_logprobs(
        self, input_ids: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = None if attention_mask is None else attention_mask.to(self.device)
        logits = self.logits(input_ids.to(self.device), mask)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        return logprobs.gather(-1, targets.to(self.device).unsqueeze(-1)).squeeze(-1)

    def reference_layout(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def compile(self) -> None:
        """`harness run --compile`: torch.compile the module in place (same parameters and state_dict
        names). Adapters with other hot paths (the scratch models' decode copy) compile those too."""
        self.module.compile()


def _capability(need: type | Capability) -> Capability:
    return need if isinstance(need, Capability) else need.capability
