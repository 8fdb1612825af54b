"""What is timed: the prefill, decode and training calls of a `CausalLM`, and the grid of them a run measures.

- prefill: a no-grad forward pass that produces logits for every position (`CausalLM.forward`: no
  KV cache kept on either side), over `batch_sizes` x `seq_lens` (lengths above the maximum skipped);
- decode: greedy generation with the KV cache (`CausalLM.generate_batch`), `new_tokens` tokens
  after a fixed `prompt_len`-token prompt, at each of `decode_batch_sizes`; the whole call is timed,
  the prefill of the short prompt included;
- train: forward + backward + AdamW step on a copy of the module (the loaded weights never change).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from harness.api import Capability
from harness.api.heads import padded_rows
from tasks.throughput.config import ThroughputConfig
from tasks.throughput.flops import model_flops_per_token
from tasks.throughput.timing import Timer

if TYPE_CHECKING:
    from harness.api import CausalLM, ModelAdapter


def random_tokens(model: CausalLM, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.tokenizer.vocab_size, (batch, length), generator=g).to(model.device)


def prefill_call(model: CausalLM, batch: int, length: int, seed: int) -> Callable[[], torch.Tensor]:
    x = random_tokens(model, batch, length, seed)
    return torch.no_grad()(lambda: model.forward(model.module, x))


def decode_call(model: CausalLM, batch: int, prompt_len: int, new_tokens: int, seed: int):
    x = random_tokens(model, batch, prompt_len, seed)
    return torch.no_grad()(lambda: model.generate_batch(x, new_tokens))


def decode_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The matrices one decode step multiplies a token by: every `nn.Linear` weight (the tied LM head
    once), plus the token embedding where no Linear maps to the vocabulary (GPT-1's W_e^T head)."""
    linears = {id(m.weight): m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)}
    embeddings = [m.weight for m in module.modules() if isinstance(m, torch.nn.Embedding)]
    if embeddings and not any(w.shape[0] == embeddings[0].shape[0] for w in linears.values()):
        linears[id(embeddings[0])] = embeddings[0]
    return list(linears.values())


def weights_read_call(model: CausalLM) -> Callable[[], None]:
    """One matrix-vector product with each decode weight: reads every weight byte of a decode step
    once, with one row of input, nothing else. Its time is the memory roofline of batch-1 decode
    (bytes of weights per token / measured bandwidth). Each weight is read in whichever layout streams
    it faster here, (out, in) or a contiguous (in, out) copy (`fastest_layout`), so the roofline is the
    best this kernel class does on this machine, not the layout a decode happens to use."""
    reads = [fastest_layout(w.detach()) for w in decode_weights(model.module)]
    return torch.no_grad()(lambda: [read() for read in reads])


def fastest_layout(weight: torch.Tensor, probes: int = 3) -> Callable[[], torch.Tensor]:
    """x @ W^T for one row x, on `weight` (out, in) or on a contiguous (in, out) copy, whichever was the
    faster of `probes` timings each (wall clock; the choice only picks the kernel, not a number)."""
    x = torch.ones(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    transposed = weight.t().contiguous()
    calls = [lambda: F.linear(x, weight), lambda: x @ transposed]
    timer = Timer(weight.device)  # wall clock, the device synchronised
    best = [min(timer.seconds(call) for _ in range(probes)) for call in calls]
    return calls[0] if best[0] <= best[1] else calls[1]  # the other (and its tensor) is dropped


def kernels_call(model: CausalLM, batch: int, length: int, seed: int) -> Callable[[], None]:
    """The GEMMs and attention of one prefill forward, alone: `F.linear` of a random (batch x length, in)
    input with every matrix of `decode_weights` (the head's rows padded to a multiple of 64 outputs, as
    the scratch prefill runs it: `heads.padded_rows`), then `n_layer` causal SDPA calls of
    (batch, heads, length, head_dim). Everything else a forward does (norms, GELU, residual adds,
    biases, views, embedding lookups) is left out, so this call's time bounds a forward's from below on
    this machine, and Kaplan FLOPs over it bound MFU from above (`mfu_bound`)."""
    cfg, device = model.weights.hf_config, model.device
    g = torch.Generator().manual_seed(seed)
    weights = [padded_rows(w.detach()) if w.shape[0] == cfg.vocab_size else w.detach()
               for w in decode_weights(model.module)]
    inputs = {n: torch.randn(batch * length, n, generator=g).to(device) for n in {w.shape[1] for w in weights}}
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=g).to(device) for _ in range(3))

    def call() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        for _ in range(cfg.num_hidden_layers):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return torch.no_grad()(call)


def weight_bytes(model: CausalLM) -> int:
    return sum(w.numel() * w.element_size() for w in decode_weights(model.module))


def train_call(model: CausalLM, batch: int, length: int, seed: int) -> Callable[[], None]:
    """One AdamW training step per call, on a private copy of the module."""
    module = copy.deepcopy(model.module).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    x = random_tokens(model, batch, length, seed)

    def step() -> None:
        with torch.enable_grad():
            logits = model.forward(module, x)
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@dataclass(frozen=True)
class Measurement:
    kind: str  # "prefill", "decode" or "train": the metric is `<kind>_tokens_per_s`
    subtask: str  # the grid point, e.g. "prefill b=1 t=128"
    tokens: int  # tokens processed per call
    context: int  # sequence length, for the attention term of the FLOP count
    flop_factor: float | None  # x forward FLOPs per token: 1 (prefill), 3 (train); None: no mfu (decode)
    build: Callable[[CausalLM], Callable[[], object]]  # model -> the call to time
    extra: dict

    def flops_per_token(self, model: CausalLM) -> float | None:
        return None if self.flop_factor is None else self.flop_factor * model_flops_per_token(model, self.context)


def plan(cfg: ThroughputConfig, models: list[ModelAdapter], seed: int) -> list[Measurement]:
    """Every grid point of `cfg.kinds` that all the models can run."""
    max_len = min(m.max_length for m in models)
    out = prefill_plan(cfg, max_len, seed) if "prefill" in cfg.kinds else []
    if "decode" in cfg.kinds and all(m.can(Capability.GENERATE) for m in models):
        out += decode_plan(cfg, max_len, seed)
    if "train" in cfg.kinds and all(m.can(Capability.TRAIN) for m in models):
        out += train_plan(cfg, max_len, seed)
    return out


def prefill_plan(cfg: ThroughputConfig, max_len: int, seed: int) -> list[Measurement]:
    return [Measurement("prefill", f"prefill b={b} t={t}", b * t, t, 1.0,
                        partial(prefill_call, batch=b, length=t, seed=seed), {"batch_size": b, "seq_len": t})
            for b in cfg.batch_sizes for t in cfg.seq_lens if t <= max_len]


def decode_plan(cfg: ThroughputConfig, max_len: int, seed: int) -> list[Measurement]:
    prompt = min(cfg.prompt_len, max_len - 1)
    new = min(cfg.new_tokens, max_len - prompt)
    return [Measurement("decode", f"decode b={b} prompt={prompt} new={new}", b * new, prompt + new, None,
                        partial(decode_call, batch=b, prompt_len=prompt, new_tokens=new, seed=seed),
                        {"batch_size": b, "prompt_len": prompt, "new_tokens": new})
            for b in cfg.decode_batch_sizes]


def train_plan(cfg: ThroughputConfig, max_len: int, seed: int) -> list[Measurement]:
    b, t = cfg.train_batch_size, min(cfg.train_seq_len, max_len)
    return [Measurement("train", f"train b={b} t={t}", b * t, t, 3.0,
                        partial(train_call, batch=b, length=t, seed=seed), {"batch_size": b, "seq_len": t})]
