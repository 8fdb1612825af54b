import math

import pytest
import torch

from tasks.ngram_rules_lang import RuleLanguage, RuleSpec

ORDERS = [2, 3, 4, 6, 8]
SPECS = [RuleSpec(n=n) for n in ORDERS] + [RuleSpec(n=3, vocab=6, allowed=4, seq_len=12, seed=5)]
SPECS += [RuleSpec(n=n, rule="lag") for n in (3, 6, 8)]  # every property below holds for both rules
SPEC_IDS = [f"n{s.n}-v{s.vocab}-k{s.allowed}-{s.rule}" for s in SPECS]


@pytest.fixture(params=SPECS, ids=SPEC_IDS)
def lang(request) -> RuleLanguage:
    return RuleLanguage(request.param)


def test_samples_always_validate(lang):
    seqs = lang.sample(64, generator=1)
    assert seqs.shape == (64, lang.spec.seq_len) and seqs.dtype == torch.long
    assert lang.token_valid(seqs).all()
    assert all(lang.validate(s).ok for s in seqs)


def test_every_corruption_outside_the_allowed_set_is_caught(lang):
    n, v = lang.spec.n, lang.spec.vocab
    for seq in lang.sample(3, generator=2):
        for t in range(n - 1, len(seq)):
            context = tuple(seq[t - n + 1 : t].tolist())
            allowed = lang.allowed(context)
            for symbol in sorted(set(range(v)) - allowed):
                bad = seq.clone()
                bad[t] = symbol
                result = lang.validate(bad)
                assert (result.ok, result.position, result.context) == (False, t, context)
                assert (result.symbol, result.allowed) == (symbol, allowed)


def test_token_valid_marks_only_the_corrupted_position():
    lang = RuleLanguage(RuleSpec(n=4))
    seqs = lang.sample(2, generator=3)
    t = 10
    context = tuple(seqs[0, t - 3 : t].tolist())
    seqs[0, t] = min(set(range(4)) - lang.allowed(context))
    valid = lang.token_valid(seqs)
    assert not valid[0, t] and valid[0, :t].all() and valid[1].all()


def test_dropping_the_oldest_symbol_leaves_the_allowed_set_undetermined(lang):
    """For every (n-2)-suffix the sets over the dropped symbol differ: union = alphabet, intersection = {}."""
    v, k, n = lang.spec.vocab, lang.spec.allowed, lang.spec.n
    groups = lang.table.view(v, v ** (n - 2), v)  # (dropped symbol, suffix, symbol)
    assert (groups.sum(-1) == k).all()  # every allowed set has k symbols
    assert (groups.sum(0) == k).all()  # balanced: each symbol allowed by exactly k dropped symbols
    assert groups.any(0).all() and not groups.all(0).any()  # union is the alphabet, intersection empty
    for s in range(groups.shape[1]):
        assert len({tuple(groups[u, s].tolist()) for u in range(v)}) > 1


def test_full_context_oracle_reaches_the_closed_form_bound(lang):
    spec = lang.spec
    closed = (spec.n - 2) * math.log(spec.vocab) + (spec.seq_len - spec.n + 1) * math.log(spec.allowed)
    closed /= spec.seq_len - 1
    seqs = lang.sample(50, generator=4)
    assert lang.entropy_bound() == pytest.approx(closed, abs=1e-12)
    assert lang.oracle_nll(seqs, spec.n - 1) == pytest.approx(closed, abs=1e-9)
    assert lang.oracle_nll(seqs, spec.n + 3) == pytest.approx(closed, abs=1e-9)  # more context does not help


def test_shorter_context_oracles_stay_strictly_above_the_bound(lang):
    n, v = lang.spec.n, lang.spec.vocab
    seqs = lang.sample(50, generator=5)
    for c in range(n - 1):
        nll = lang.oracle_nll(seqs, c)
        assert nll == pytest.approx(lang.expected_nll(c), abs=1e-9) == pytest.approx(math.log(v))
        assert nll > lang.entropy_bound() + 0.1


def test_oracle_probs_are_distributions_aligned_with_targets(lang):
    seqs = lang.sample(4, generator=6)
    probs = lang.oracle_probs(seqs, lang.spec.n - 1)
    assert probs.shape == (*seqs.shape, lang.spec.vocab) and probs.dtype == torch.float64
    torch.testing.assert_close(probs.sum(-1), torch.ones(seqs.shape, dtype=torch.float64))
    targets = probs[:, :-1].gather(-1, seqs[:, 1:, None])
    assert (targets > 0).all()  # the true next symbol is always possible


def test_empirical_conditionals_match_the_oracle_mixture():
    """Counted (n-1)-gram frequencies on samples are uniform, as the uniform-prior argument predicts."""
    lang = RuleLanguage(RuleSpec(n=3))
    seqs = lang.sample(4000, generator=7)
    pairs = seqs[:, 1:-1] * 4 + seqs[:, 2:]  # (previous symbol, symbol) at constrained positions
    freq = torch.bincount(pairs.flatten(), minlength=16).view(4, 4).double()
    freq = freq / freq.sum(-1, keepdim=True)
    torch.testing.assert_close(freq, torch.full((4, 4), 0.25, dtype=torch.float64), atol=0.02, rtol=0)


def test_same_seed_same_language_and_samples():
    a, b = RuleLanguage(RuleSpec(n=5, seed=3)), RuleLanguage(RuleSpec(n=5, seed=3))
    assert torch.equal(a.table, b.table)
    assert torch.equal(a.sample(8, generator=9), b.sample(8, generator=torch.Generator().manual_seed(9)))
    assert not torch.equal(a.sample(8, generator=9), a.sample(8, generator=10))
    assert not torch.equal(a.table, RuleLanguage(RuleSpec(n=5, seed=4)).table)


def test_allowed_matches_the_table():
    lang = RuleLanguage(RuleSpec(n=3, seed=1))
    for u in range(4):
        for s in range(4):
            assert lang.allowed((u, s)) == frozenset(lang.table[u * 4 + s].nonzero().flatten().tolist())


@pytest.mark.parametrize(
    "kwargs",
    [dict(n=1), dict(n=3, allowed=4), dict(n=3, allowed=0), dict(n=5, seq_len=4), dict(n=13)],
    ids=["n-too-small", "allowed-eq-vocab", "allowed-zero", "seq-too-short", "table-too-big"],
)
def test_bad_specs_fail_with_a_message(kwargs):
    with pytest.raises(ValueError, match="RuleSpec|contexts"):
        RuleSpec(**kwargs)


def test_bad_inputs_fail_with_a_message():
    lang = RuleLanguage(RuleSpec(n=3))
    with pytest.raises(ValueError, match="context must be 2 symbols"):
        lang.allowed((1,))
    with pytest.raises(ValueError, match="symbols must lie"):
        lang.token_valid(torch.tensor([0, 1, 4]))


@pytest.mark.parametrize("n", [3, 6, 8])
def test_lag_rule_depends_on_the_symbol_n_minus_1_back_alone(n):
    v = 4
    lag = RuleLanguage(RuleSpec(n=n, rule="lag", seed=2)).table.view(v, v ** (n - 2), v)  # (oldest, suffix, symbol)
    assert (lag == lag[:, :1]).all()  # the same band for every suffix
    table = RuleLanguage(RuleSpec(n=n, seed=2)).table.view(v, v ** (n - 2), v)
    assert not (table == table[:, :1]).all()  # the table rule's band changes with the suffix


def test_lag_rule_splits_into_independent_chains():
    """Symbols fewer than N-1 apart are independent: the empirical law of a pair (x_t, x_{t+d}) with
    d < N-1 is uniform on V x V; at d = N-1 it puts mass only on allowed pairs."""
    n, v = 5, 4
    lang = RuleLanguage(RuleSpec(n=n, rule="lag"))
    seqs = lang.sample(20_000, generator=0)
    for d in range(1, n):
        counts = torch.zeros(v, v)
        counts.index_put_((seqs[:, 4], seqs[:, 4 + d]), torch.ones(len(seqs)), accumulate=True)
        share = counts / counts.sum()
        if d < n - 1:
            assert (share - 1 / v**2).abs().max() < 0.01
        else:
            band = lang.table.view(v, -1, v)[:, 0].double()  # allowed set of each oldest symbol
            assert share[band == 0].sum() == 0 and (share[band == 1] - 1 / (v * 2)).abs().max() < 0.01


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="rule must be one of table, lag"):
        RuleSpec(n=3, rule="lags")
