"""A ladder of small language models over an integer vocabulary (characters, rule symbols).

Each rung adds one idea to the one below it:

* ``NGramCounts`` -- the counting n-gram model (Shannon 1948; bigram = order 2,
  trigram = order 3) with add-k (Lidstone) smoothing, see Chen & Goodman 1999,
  "An Empirical Study of Smoothing Techniques for Language Modeling".
* ``NeuralNGram`` -- Bengio, Ducharme, Vincent & Jauvin 2003, "A Neural
  Probabilistic Language Model": the same fixed window, but tokens become learned
  feature vectors ``C`` and the table becomes an MLP,
  ``y = b + W x + U tanh(d + H x)`` (``W``, the direct connections, optional).
* ``RNNLM`` -- an unbounded context carried in a recurrent state: Elman 1990,
  "Finding Structure in Time" (``cell="rnn"``); Hochreiter & Schmidhuber 1997,
  "Long Short-Term Memory" (``"lstm"``, with the forget gate of Gers, Schmidhuber
  & Cummins 2000 as in every modern LSTM); Cho et al. 2014, "Learning Phrase
  Representations using RNN Encoder-Decoder" (``"gru"``).  All three cells are
  written here; their parameters carry the names and layouts of
  ``torch.nn.RNNCell/LSTMCell/GRUCell`` so parity with torch is a state-dict copy.

The next rung, a character-level GPT, lives in ``reproductions/gpt2.py``.

Every model is a ``CharLM``: ``logits(idx (B, T)) -> (B, T, V)`` where position
``t`` scores token ``t + 1`` and sees only tokens ``<= t``, plus ``sample`` and
``nll``.  Count models are fitted with ``fit(data)``; neural ones with
``train_lm`` (AdamW, Loshchilov & Hutter 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reproductions.common import sample_next

TINY_SHAKESPEARE = Path(__file__).resolve().parents[1] / "tasks" / "data" / "tinyshakespeare" / "input.txt"
MAX_COUNTS = 1 << 24  # V**order cells of float64 counts: 128 MiB

BatchesFn = Callable[[torch.Generator], torch.Tensor]  # generator -> (B, T) int64 batch


# ---- characters ---------------------------------------------------------------------------------
def load_text(path: str | Path = TINY_SHAKESPEARE) -> str:
    return Path(path).read_text(encoding="utf-8")


def char_vocab(text: str) -> tuple[dict[str, int], list[str]]:
    """Sorted character vocabulary: (stoi, itos)."""
    itos = sorted(set(text))
    return {ch: i for i, ch in enumerate(itos)}, itos


def encode(text: str, stoi: dict[str, int]) -> torch.Tensor:
    return torch.tensor([stoi[ch] for ch in text], dtype=torch.long)


def decode(ids: torch.Tensor | list[int], itos: list[str]) -> str:
    return "".join(itos[int(i)] for i in ids)


# ---- the shared interface -----------------------------------------------------------------------
class CharLM(nn.Module):
    """A next-token model over ``vocab`` symbols; subclasses implement ``logits``."""

    vocab: int

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, V): position t scores token t+1 from tokens 0..t."""
        raise NotImplementedError

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits(idx)

    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Attention probabilities (n_layer, B, n_head, T, T) for models that attend; None otherwise."""
        return None

    @torch.no_grad()
    def nll(self, idx: torch.Tensor) -> float:
        """Mean next-token NLL in nats of idx[:, 1:] given its prefixes."""
        return float(next_token_loss(self.logits(idx), idx))

    @torch.no_grad()
    def sample(
        self,
        num: int,
        length: int,
        generator: torch.Generator | None = None,
        prefix: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """(num, length) int64 sequences that start with ``prefix`` ((P,) or (num, P)).

        Without a prefix the first token is drawn uniformly (no model here has a BOS token).
        """
        if prefix is None:
            idx = torch.randint(self.vocab, (num, 1), generator=generator)
        else:
            idx = prefix.long().expand(num, -1).clone() if prefix.dim() == 1 else prefix.long().clone()
        if not 1 <= idx.shape[1] <= length or idx.shape[0] != num:
            raise ValueError(
                f"prefix must be (P,) or ({num}, P) with 1 <= P <= {length}; got {tuple(idx.shape)}"
            )
        while idx.shape[1] < length:
            last = self.logits(idx)[:, -1].float()  # (num, V)
            idx = torch.cat([idx, sample_next(last, temperature, generator=generator)], dim=1)
        return idx


def next_token_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of idx[:, 1:] under logits[:, :-1]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


# ---- counting n-grams ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NGramConfig:
    vocab: int
    order: int = 2  # n: predicts a token from the n-1 before it (2 = bigram, 3 = trigram)
    add_k: float = 0.1  # pseudo-count per (context, token); 1.0 is Laplace, 0 gives -inf on unseen pairs

    def __post_init__(self) -> None:
        if self.order < 1 or self.add_k < 0:
            raise ValueError(f"NGramConfig needs order >= 1 and add_k >= 0 (got {self.order}, {self.add_k})")
        if self.vocab**self.order > MAX_COUNTS:
            raise ValueError(
                f"vocab**order = {self.vocab**self.order} counts exceeds {MAX_COUNTS}; lower order"
            )


class NGramCounts(CharLM):
    """Counts of (n-1 tokens, next token); positions with less context use the counts
    marginalised over the missing oldest tokens (so order n is exact from token n-1 on)."""

    def __init__(self, config: NGramConfig) -> None:
        super().__init__()
        self.config, self.vocab = config, config.vocab
        self.register_buffer(
            "counts", torch.zeros(config.vocab ** (config.order - 1), config.vocab, dtype=torch.float64)
        )

    def fit(self, data: torch.Tensor) -> NGramCounts:
        """Add the n-grams of ``data`` ((T,) stream or (B, T) rows; windows never cross rows)."""
        rows = data.long().reshape(-1, data.shape[-1])
        windows = rows.unfold(1, self.config.order, 1)  # (B, T-n+1, n)
        grams = _base_index(windows, self.vocab).flatten()
        self.counts += torch.bincount(grams, minlength=self.counts.numel()).view_as(self.counts).double()
        return self

    def log_probs(self, context_len: int) -> torch.Tensor:
        """(V**c, V) smoothed log P(next | last c tokens), c <= order-1."""
        v, dropped = self.vocab, self.config.order - 1 - context_len
        counts = self.counts.view(v**dropped, v**context_len, v).sum(0) + self.config.add_k
        return counts.log() - counts.sum(-1, keepdim=True).log()

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        (b, t), width = idx.shape, self.config.order - 1
        out = torch.empty(b, t, self.vocab, dtype=torch.float64)
        for pos in range(min(width - 1, t)):  # too close to the start for a full context
            out[:, pos] = self.log_probs(pos + 1)[_base_index(idx[:, : pos + 1], self.vocab)]
        if t >= width:
            windows = idx.unfold(1, width, 1) if width else idx.new_zeros(b, t, 0)  # (B, T-width+1, width)
            out[:, max(width - 1, 0) :] = self.log_probs(width)[_base_index(windows, self.vocab)]
        return out.to(torch.get_default_dtype())


def _base_index(digits: torch.Tensor, base: int) -> torch.Tensor:
    """Base-`base` number of the last dimension, most significant (oldest) digit first."""
    weights = base ** torch.arange(digits.shape[-1] - 1, -1, -1, dtype=torch.long)
    return (digits.long() * weights).sum(-1)


# ---- Bengio et al. 2003 -------------------------------------------------------------------------
@dataclass(frozen=True)
class NeuralNGramConfig:
    vocab: int
    context: int = 3  # n-1 previous tokens fed to the MLP
    n_embd: int = 16  # m, size of a token's feature vector C(w)
    n_hidden: int = 128  # h, hidden tanh units
    direct: bool = False  # the paper's optional direct connections W from features to logits


class NeuralNGram(CharLM):
    """y = b + W x + U tanh(d + H x), x = concatenated features of the previous tokens.

    Positions near the start are padded with an extra learned "before the text" vector (row V of C).
    """

    def __init__(self, config: NeuralNGramConfig) -> None:
        super().__init__()
        self.config, self.vocab = config, config.vocab
        width = config.context * config.n_embd
        self.C = nn.Embedding(config.vocab + 1, config.n_embd)
        self.H = nn.Linear(width, config.n_hidden)  # bias = d
        self.U = nn.Linear(config.n_hidden, config.vocab)  # bias = b
        self.W = nn.Linear(width, config.vocab, bias=False) if config.direct else None

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        pad = idx.new_full((b, self.config.context - 1), self.vocab)
        windows = torch.cat([pad, idx], dim=1).unfold(1, self.config.context, 1)  # (B, T, context)
        x = self.C(windows).reshape(b, t, -1)  # (B, T, context * m)
        y = self.U(torch.tanh(self.H(x)))
        return y + self.W(x) if self.W is not None else y


# ---- recurrent networks -------------------------------------------------------------------------
class _Cell(nn.Module):
    """Weights laid out like torch.nn.*Cell: (gates * H, in) and (gates * H, H), torch's init."""

    gates = 1

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(self.gates * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(self.gates * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(self.gates * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(self.gates * hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def init_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        return (self.weight_hh.new_zeros(batch, self.hidden_size),)

    def _pre(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.linear(x, self.weight_ih, self.bias_ih), F.linear(h, self.weight_hh, self.bias_hh)

    def scan(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Hidden states (B, T, H) of the cell run over x (B, T, in) from ``state``: the plain loop,
        one call of the cell per position.

        Each cell overrides it with the same function arranged for speed as cuDNN does (tested
        against this loop): the input projections of all T positions in one matmul before the loop,
        then per position one ``addmm`` for the recurrent product and as few elementwise ops as the
        gates allow. A training step of these tiny models is mostly per-op overhead over T positions.
        """
        hidden = []
        for t in range(x.shape[1]):
            state = self(x[:, t], state)
            hidden.append(state[0])
        return torch.stack(hidden, dim=1)


class ElmanCell(_Cell):
    """h' = tanh(W_ih x + b_ih + W_hh h + b_hh)   (Elman 1990)."""

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        gx, gh = self._pre(x, state[0])
        return (torch.tanh(gx + gh),)

    def scan(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h, w_hh = state[0], self.weight_hh.t()
        hidden = []
        for gx in F.linear(x, self.weight_ih, self.bias_ih + self.bias_hh).unbind(1):  # (B, H) per position
            h = torch.addmm(gx, h, w_hh).tanh()
            hidden.append(h)
        return torch.stack(hidden, dim=1)


class LSTMCell(_Cell):
    """Gates i, f, g, o (torch's order); c' = f c + i g, h' = o tanh(c')."""

    gates = 4

    def init_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        return super().init_state(batch) * 2  # (h, c)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h, c = state
        gx, gh = self._pre(x, h)
        i, f, g, o = (gx + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def scan(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (h, c), w_hh, H = state, self.weight_hh.t(), self.hidden_size
        hidden = []
        for gx in F.linear(x, self.weight_ih, self.bias_ih + self.bias_hh).unbind(1):  # (B, 4H) per position
            gates = torch.addmm(gx, h, w_hh)
            i, f, _, o = gates.sigmoid().chunk(4, dim=-1)  # one sigmoid for i, f, o (g's share unused)
            c = torch.addcmul(f * c, i, gates[:, 2 * H:3 * H].tanh())
            h = o * c.tanh()
            hidden.append(h)
        return torch.stack(hidden, dim=1)


class GRUCell(_Cell):
    """Gates r, z, n (torch's order); n = tanh(x_n + r (W_hn h + b_hn)), h' = (1 - z) n + z h."""

    gates = 3

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h = state[0]
        gx, gh = self._pre(x, h)
        xr, xz, xn = gx.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return ((1 - z) * n + z * h,)

    def scan(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h, w_hh, H = state[0], self.weight_hh.t(), self.hidden_size
        hidden = []
        for gx in F.linear(x, self.weight_ih, self.bias_ih).unbind(1):  # (B, 3H) per position
            gh = torch.addmm(self.bias_hh, h, w_hh)
            r, z = (gx[:, :2 * H] + gh[:, :2 * H]).sigmoid().chunk(2, dim=-1)
            n = torch.addcmul(gx[:, 2 * H:], r, gh[:, 2 * H:]).tanh()
            h = torch.lerp(n, h, z)  # n + z (h - n) = (1 - z) n + z h
            hidden.append(h)
        return torch.stack(hidden, dim=1)


CELLS: dict[str, type[_Cell]] = {"rnn": ElmanCell, "lstm": LSTMCell, "gru": GRUCell}


@dataclass(frozen=True)
class RNNConfig:
    vocab: int
    cell: str = "rnn"  # one of CELLS
    n_embd: int = 32
    n_hidden: int = 128

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose one of {sorted(CELLS)}")


class RNNLM(CharLM):
    """Embedding -> recurrent cell, one step per token -> linear head."""

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        self.config, self.vocab = config, config.vocab
        self.wte = nn.Embedding(config.vocab, config.n_embd)
        self.cell = CELLS[config.cell](config.n_embd, config.n_hidden)
        self.lm_head = nn.Linear(config.n_hidden, config.vocab)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        hidden = self.cell.scan(self.wte(idx), self.cell.init_state(idx.shape[0]))  # (B, T, H)
        return self.lm_head(hidden)  # (B, T, V)


# ---- building and training ----------------------------------------------------------------------
MODELS: dict[type, type[CharLM]] = {
    NGramConfig: NGramCounts,
    NeuralNGramConfig: NeuralNGram,
    RNNConfig: RNNLM,
}


def build_model(config: NGramConfig | NeuralNGramConfig | RNNConfig, seed: int = 0) -> CharLM:
    """The model for ``config``, initialised from ``seed`` without touching the global RNG."""
    if type(config) not in MODELS:
        raise ValueError(
            f"no model for {type(config).__name__}; known configs: {[c.__name__ for c in MODELS]}"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MODELS[type(config)](config)


SCHEDULES = ("constant", "cosine")


def train_lm(
    model: CharLM,
    batches_fn: BatchesFn,
    steps: int,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    schedule: str = "constant",
) -> list[float]:
    """Minimise next-token cross-entropy with AdamW; returns the loss of every step.

    ``seed`` drives the batches (the generator handed to ``batches_fn``); the model's own
    initialisation is ``build_model``'s. ``schedule`` is "constant" (``lr`` throughout) or "cosine"
    (``lr`` at the first step, half a cosine down to 0 after the last; Loshchilov & Hutter 2017).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} (got {schedule!r})")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for step in range(steps):
        if schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = batches_fn(gen)
        loss = next_token_loss(model.logits(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def window_batches(stream: torch.Tensor, batch_size: int, block_size: int) -> BatchesFn:
    """Random contiguous windows (batch_size, block_size) of a 1-D token stream."""
    offsets = torch.arange(block_size)

    def batches(gen: torch.Generator) -> torch.Tensor:
        starts = torch.randint(len(stream) - block_size + 1, (batch_size, 1), generator=gen)
        return stream[starts + offsets]

    return batches


def row_batches(rows: torch.Tensor, batch_size: int) -> BatchesFn:
    """Random rows (with replacement) of a (N, T) tensor of sequences."""
    return lambda gen: rows[torch.randint(len(rows), (batch_size,), generator=gen)]
