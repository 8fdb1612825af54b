"""A synthetic "rule language" whose constraints need exactly N tokens of context.

Every sequence is drawn over an alphabet of ``V = vocab`` symbols:

* the first ``N-1`` symbols are i.i.d. uniform (no BOS token: the prefix is the
  unconstrained part of the sequence);
* every later symbol ``x_t`` is uniform over an allowed set ``A(x_{t-N+1..t-1})``
  of ``k = allowed`` symbols, picked by a seeded table of the previous ``N-1``
  symbols.

The table is *balanced*: for each suffix ``s`` of ``N-2`` symbols, the ``V``
allowed sets ``A(u, s)`` (one per value ``u`` of the oldest, dropped symbol)
cover every symbol exactly ``k`` times.  Each group is the cyclic band
``{j : (j - i) mod V < k}`` of a ``V x V`` matrix with its rows (values of
``u``) and columns (symbols) shuffled by seeded permutations, one pair per
suffix.  Balance has two consequences, both exact:

1. The Markov chain on windows of ``N-1`` symbols is doubly stochastic, so its
   stationary law is uniform; since the prefix starts uniform, every window of
   ``N-1`` symbols is uniform at every position.  Hence the best predictor that
   sees only the last ``c < N-1`` symbols is the mixture of the allowed-set
   distributions under a *uniform* prior on the dropped symbols: the
   uniform-prior mixture is the exact Bayes-optimal ``c``-context predictor.
2. That mixture is uniform over all ``V`` symbols.  With ``c < N-1`` symbols of
   context nothing at all can be predicted (NLL ``log V``); with ``N-1`` symbols
   the NLL drops to ``log k``.  Because ``k < V`` the sets ``A(u, s)`` must
   differ across ``u``: the dropped symbol always matters.

Closed forms for a sequence of length ``L``, scored on the next-token targets
``x_1 .. x_{L-1}`` (``x_0`` has no context, as in language-model training):
``N-2`` prefix targets cost ``log V`` each, ``L-N+1`` constrained targets cost
``log k`` (with ``>= N-1`` symbols of context) or ``log V`` (with fewer), so

    entropy_bound = ((N-2) log V + (L-N+1) log k) / (L-1)    nats per token.

It is an instance of the classic n-gram / Markov-source setting (Shannon 1948,
"A Mathematical Theory of Communication", sec. 3); the balanced construction is
ours.  Bump ``TASK_VERSION`` whenever generation or scoring changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TASK_VERSION = 1
# "table": the allowed set is a function of all N-1 previous symbols (a random table: learning it is
#          a sparse-parity-like search, since every shorter context carries exactly no signal);
# "lag":   the allowed set is a function of the symbol N-1 back alone, the same band for every
#          suffix: the sequence splits into N-1 interleaved independent chains, so every claim above
#          still holds exactly, while one attention head at offset N-1 suffices to learn it.
RULES = ("table", "lag")
MAX_CONTEXTS = 1 << 22  # V**(N-1) table rows; 4M rows of V bools stays well under a GiB


@dataclass(frozen=True)
class RuleSpec:
    """A rule language.

    Defaults (V=4, k=2, L=32) keep the table small enough to be learned on a CPU:
    ``4**(N-1)`` contexts is 1024 for N=6 (about 30 visits each in 1,200
    sequences) and 16,384 for N=8; the gap ``log 4 - log 2 = 0.69`` nats per
    constrained token is large enough to read off a loss curve, and L=32 leaves
    ``L-N+1 >= 25`` constrained positions per sequence for N <= 8.
    """

    n: int  # the rule needs n tokens: the symbol and its n-1 predecessors
    vocab: int = 4  # alphabet size V
    allowed: int = 2  # size k of each allowed set, 1 <= k < V
    seq_len: int = 32  # L, symbols per sequence, prefix included
    seed: int = 0  # seeds the rule table (not the samples)
    rule: str = "table"  # "table": one shuffled band per (N-2)-suffix; "lag": one band for all (see RULES)

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"RuleSpec.n must be >= 2 (got {self.n})")
        if not 1 <= self.allowed < self.vocab:
            raise ValueError(f"RuleSpec needs 1 <= allowed < vocab (got {self.allowed} and {self.vocab})")
        if self.seq_len < self.n:
            raise ValueError(f"RuleSpec.seq_len must be >= n (got seq_len={self.seq_len}, n={self.n})")
        if self.rule not in RULES:
            raise ValueError(f"RuleSpec.rule must be one of {', '.join(RULES)} (got {self.rule!r})")
        if self.vocab ** (self.n - 1) > MAX_CONTEXTS:
            contexts = self.vocab ** (self.n - 1)
            raise ValueError(f"vocab**(n-1) = {contexts} contexts exceeds {MAX_CONTEXTS}; lower n or vocab")


@dataclass(frozen=True)
class Validation:
    """Result of RuleLanguage.validate: the first violated constraint, if any."""

    ok: bool
    position: int | None = None  # index of the first symbol outside its allowed set
    context: tuple[int, ...] | None = None  # the n-1 symbols before it
    symbol: int | None = None
    allowed: frozenset[int] | None = None


class RuleLanguage:
    """Generator, checker and oracle for one RuleSpec."""

    def __init__(self, spec: RuleSpec) -> None:
        self.spec = spec
        self.table = _balanced_table(spec)  # (V**(N-1), V) bool; row = base-V context, oldest symbol first

    # ---- the rule ---------------------------------------------------------
    def allowed(self, context: tuple[int, ...] | list[int] | torch.Tensor) -> frozenset[int]:
        """The allowed set after the given n-1 symbols (oldest first)."""
        context, n, v = [int(c) for c in context], self.spec.n, self.spec.vocab
        if len(context) != n - 1 or not all(0 <= c < v for c in context):
            raise ValueError(f"context must be {n - 1} symbols in [0, {v}) (got {context})")
        row = self.table[_context_index(torch.tensor(context), v)]
        return frozenset(row.nonzero().flatten().tolist())

    def sample(self, num: int, generator: torch.Generator | int = 0) -> torch.Tensor:
        """Draw ``num`` sequences (num, seq_len) int64; an int generator is a seed."""
        gen = _as_generator(generator)
        n, v = self.spec.n, self.spec.vocab
        seqs = torch.empty(num, self.spec.seq_len, dtype=torch.long)
        seqs[:, : n - 1] = torch.randint(v, (num, n - 1), generator=gen)
        for t in range(n - 1, self.spec.seq_len):
            mask = self.table[_context_index(seqs[:, t - n + 1 : t], v)]  # (num, V)
            seqs[:, t] = torch.multinomial(mask.double(), 1, generator=gen).squeeze(1)
        return seqs

    # ---- checking ---------------------------------------------------------
    def token_valid(self, seqs: torch.Tensor) -> torch.Tensor:
        """Bool mask, same shape as seqs ((L,) or (B, L)): True where the symbol is allowed."""
        self._check_symbols(seqs)
        flat = seqs.reshape(-1, seqs.shape[-1])
        n, v = self.spec.n, self.spec.vocab
        ok = torch.ones_like(flat, dtype=torch.bool)
        if flat.shape[1] >= n:
            windows = flat.unfold(1, n - 1, 1)[:, :-1]  # (B, L-n+1, n-1): the context of each position >= n-1
            rows = self.table[_context_index(windows, v)]  # (B, L-n+1, V)
            ok[:, n - 1 :] = rows.gather(-1, flat[:, n - 1 :, None]).squeeze(-1)
        return ok.reshape(seqs.shape)

    def validate(self, seq: torch.Tensor) -> Validation:
        """Check one sequence (L,); report the first position whose symbol breaks its rule."""
        if seq.dim() != 1:
            raise ValueError(f"validate takes one sequence of shape (L,), got {tuple(seq.shape)}")
        bad = (~self.token_valid(seq)).nonzero().flatten()
        if len(bad) == 0:
            return Validation(ok=True)
        pos = int(bad[0])
        context = tuple(seq[pos - self.spec.n + 1 : pos].tolist())
        return Validation(False, pos, context, int(seq[pos]), self.allowed(context))

    def _check_symbols(self, seqs: torch.Tensor) -> None:
        if seqs.numel() and (seqs.min() < 0 or seqs.max() >= self.spec.vocab):
            low, high = int(seqs.min()), int(seqs.max())
            raise ValueError(f"symbols must lie in [0, {self.spec.vocab}); got range [{low}, {high}]")

    # ---- information-theoretic scoring ------------------------------------
    def expected_nll(self, context_len: int) -> float:
        """Exact expected NLL (nats/token) over targets 1..L-1 of the best c-symbol predictor."""
        n, v, k, length = self.spec.n, self.spec.vocab, self.spec.allowed, self.spec.seq_len
        constrained = math.log(k) if context_len >= n - 1 else math.log(v)
        return ((n - 2) * math.log(v) + (length - n + 1) * constrained) / (length - 1)

    def entropy_bound(self) -> float:
        """True entropy rate in nats per predicted token (targets 1..L-1), prefix included."""
        return self.expected_nll(self.spec.n - 1)

    def oracle_probs(self, idx: torch.Tensor, context_len: int) -> torch.Tensor:
        """(B, T, V) float64: the Bayes-optimal law of token t+1 given tokens max(0, t+1-c)..t.

        Aligned with language-model logits: position t predicts idx[:, t+1].  For c >= n-1 it is
        the true conditional; for c < n-1 it is the mixture over the dropped symbols (uniform
        prior, exact here because every window is uniform; see the module docstring).
        """
        self._check_symbols(idx)
        n, v = self.spec.n, self.spec.vocab
        c = min(context_len, n - 1)
        probs = torch.full((*idx.shape, v), 1.0 / v, dtype=torch.float64)  # prefix targets are uniform
        if idx.shape[1] >= n - 1:
            rule = self.table.double() / self.spec.allowed
            mix = rule.view(v ** (n - 1 - c), v**c, v).mean(0)  # marginalise the n-1-c oldest symbols
            recent = idx.unfold(1, n - 1, 1)[..., n - 1 - c :]  # (B, T-n+2, c): last c of each full window
            probs[:, n - 2 :] = mix[_context_index(recent, v)]
        return probs

    def oracle_nll(self, seqs: torch.Tensor, context_len: int) -> float:
        """Mean NLL (nats/token, float64) of the c-context oracle on targets seqs[:, 1:]."""
        probs = self.oracle_probs(seqs, context_len)[:, :-1]  # (B, L-1, V)
        picked = probs.gather(-1, seqs[:, 1:, None]).squeeze(-1)
        return float(-picked.log().mean())


def _balanced_table(spec: RuleSpec) -> torch.Tensor:
    """(V**(N-1), V) bool table; for each (N-2)-suffix the V rows are a shuffled cyclic band."""
    v, k, groups = spec.vocab, spec.allowed, spec.vocab ** (spec.n - 2)
    gen = torch.Generator().manual_seed(spec.seed)
    drawn = groups if spec.rule == "table" else 1  # "lag": every suffix shares one band
    row_pos = torch.rand(drawn, v, generator=gen).argsort(-1).expand(groups, v)  # slot of each dropped symbol u
    col_pos = torch.rand(drawn, v, generator=gen).argsort(-1).expand(groups, v)  # where each symbol sits
    band = (col_pos[:, None, :] - row_pos[:, :, None]) % v < k  # (groups, u, symbol): each column sums to k
    return band.transpose(0, 1).reshape(v ** (spec.n - 1), v)  # oldest symbol is the most significant digit


def _context_index(context: torch.Tensor, vocab: int) -> torch.Tensor:
    """Base-`vocab` number of the last dimension (oldest symbol most significant)."""
    width = context.shape[-1]
    weights = vocab ** torch.arange(width - 1, -1, -1, dtype=torch.long)
    return (context.long() * weights).sum(-1)


def _as_generator(generator: torch.Generator | int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))
