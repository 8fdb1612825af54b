"""Peak FLOP/s of the machine (square matmuls) and the FLOPs a model spends per token.

Per-token FLOPs follow Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", Table 1):
forward 2N + 2 n_layer T d_model, training 3x forward (their C = 6N rule). The attention term is
the causal one: a token attends to T/2 keys on average, through two matmuls; PaLM (Chowdhery et
al. 2022, Appendix B) writes 12 n_layer d T for training because it counts non-causal attention.
N counts the weights used in matmuls: every parameter except the embedding tables, plus the
(tied) unembedding.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from tasks.throughput.timing import Timer

if TYPE_CHECKING:
    from harness.api import CausalLM


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # native bf16 (AVX512-BF16 / AMX)
    except (AttributeError, RuntimeError):
        return False


def matmul_call(dtype: torch.dtype, n: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """One n x n @ n x n matmul (2 n^3 FLOPs) per call."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device).to(dtype) for _ in range(2))
    return lambda: torch.mm(a, b)


def matmul_flops(dtype: torch.dtype, n: int, timer: Timer) -> list[float]:
    """FLOP/s of each sample of the square matmul."""
    samples = timer.interleaved({"mm": partial(matmul_call, dtype, n, timer.device)})["mm"]
    return [2 * n**3 / s for s in samples.seconds]


def matmul_params(module: nn.Module, vocab_size: int, d_model: int) -> int:
    """Weights used in matmuls: all parameters but embedding tables, plus the unembedding
    (d_model x vocab) where it is tied to the token embedding or is not a parameter of its own."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    n = sum(p.numel() for p in module.parameters() if id(p) not in embeddings)
    own_head = any(isinstance(m, nn.Linear) and m.weight.shape == (vocab_size, d_model)
                   and id(m.weight) not in embeddings for m in module.modules())
    return n if own_head else n + vocab_size * d_model


def forward_flops_per_token(n_params: int, n_layer: int, d_model: int, context: int) -> float:
    """Kaplan et al. 2020, Table 1: 2N + 2 n_layer n_ctx d_attn (causal attention, d_attn = d_model)."""
    return 2 * n_params + 2 * n_layer * context * d_model


def model_flops_per_token(model: CausalLM, context: int) -> float:
    cfg = model.weights.hf_config
    n = matmul_params(model.module, cfg.vocab_size, cfg.hidden_size)
    return forward_flops_per_token(n, cfg.num_hidden_layers, cfg.hidden_size, context)
