import math

import pytest
import torch
from torch import nn

from reproductions.charlm import (
    TINY_SHAKESPEARE,
    ElmanCell,
    GRUCell,
    LSTMCell,
    NeuralNGramConfig,
    NGramConfig,
    RNNConfig,
    _Cell,
    build_model,
    char_vocab,
    decode,
    encode,
    load_text,
    row_batches,
    train_lm,
    window_batches,
)
from tasks.ngram_rules_lang import RuleLanguage, RuleSpec

V = 5
CONFIGS = [
    NGramConfig(vocab=V, order=1),
    NGramConfig(vocab=V, order=2),
    NGramConfig(vocab=V, order=4, add_k=1.0),
    NeuralNGramConfig(vocab=V, context=3, n_embd=4, n_hidden=16),
    NeuralNGramConfig(vocab=V, context=2, n_embd=4, n_hidden=16, direct=True),
    RNNConfig(vocab=V, cell="rnn", n_embd=4, n_hidden=16),
    RNNConfig(vocab=V, cell="lstm", n_embd=4, n_hidden=16),
    RNNConfig(vocab=V, cell="gru", n_embd=4, n_hidden=16),
]
IDS = ["unigram", "bigram", "4gram-laplace", "bengio", "bengio-direct", "elman", "lstm", "gru"]


def fitted(config, seed: int = 0):
    model = build_model(config, seed=seed)
    if isinstance(config, NGramConfig):
        model.fit(torch.randint(V, (20, 30), generator=torch.Generator().manual_seed(seed)))
    return model


# ---- characters ----------------------------------------------------------------------------------
def test_char_vocab_round_trip():
    stoi, itos = char_vocab("hello, world")
    assert itos == sorted(set("hello, world")) and all(itos[stoi[c]] == c for c in itos)
    assert decode(encode("world", stoi), itos) == "world"


def test_tiny_shakespeare_vocabulary():
    text = load_text(TINY_SHAKESPEARE)
    stoi, itos = char_vocab(text)
    assert len(text) == 1_115_394 and len(itos) == 65 and itos[0] == "\n"


# ---- counting n-grams ----------------------------------------------------------------------------
def test_bigram_counts_equal_hand_counts():
    model = build_model(NGramConfig(vocab=3, order=2, add_k=0.5)).fit(torch.tensor([0, 1, 1, 2, 0, 1]))
    hand = torch.zeros(3, 3, dtype=torch.float64)
    for a, b in [(0, 1), (1, 1), (1, 2), (2, 0), (0, 1)]:
        hand[a, b] += 1
    assert torch.equal(model.counts, hand)
    probs = model.logits(torch.tensor([[1]])).exp()[0, 0].double()
    torch.testing.assert_close(probs, torch.tensor([0.5, 1.5, 1.5], dtype=torch.float64) / 3.5)


def test_trigram_counts_and_short_context_marginal():
    model = build_model(NGramConfig(vocab=2, order=3, add_k=0.0)).fit(torch.tensor([[0, 0, 1, 0, 0, 1]]))
    assert model.counts.view(2, 2, 2)[0, 0].tolist() == [0.0, 2.0]  # "001" twice
    assert model.counts.view(2, 2, 2)[0, 1].tolist() == [1.0, 0.0]  # "010"
    assert model.counts.sum() == 4
    first = model.logits(torch.tensor([[0, 0]])).exp()[0, 0]  # one token of context: counts of "?0x"
    torch.testing.assert_close(first, torch.tensor([1 / 3, 2 / 3]))


def test_rows_do_not_leak_into_each_other():
    model = build_model(NGramConfig(vocab=3, order=2)).fit(torch.tensor([[0, 1], [2, 2]]))
    assert model.counts.sum() == 2 and model.counts[1].sum() == 0


@pytest.mark.parametrize("n", [2, 3, 4], ids=lambda n: f"rule-n{n}")
def test_order_n_counts_reach_the_rule_entropy_bound(n):
    lang = RuleLanguage(RuleSpec(n=n))
    train, test = lang.sample(2000, generator=1), lang.sample(500, generator=2)
    exact = build_model(NGramConfig(vocab=4, order=n)).fit(train)
    short = build_model(NGramConfig(vocab=4, order=n - 1)).fit(train)
    assert exact.nll(test) == pytest.approx(lang.entropy_bound(), abs=0.01)
    assert short.nll(test) > math.log(4) - 0.01  # one token short of the rule: no better than uniform


def test_fitted_ngram_without_smoothing_samples_valid_rule_text():
    lang = RuleLanguage(RuleSpec(n=3))
    model = build_model(NGramConfig(vocab=4, order=3, add_k=0.0)).fit(lang.sample(500, generator=3))
    prefix = lang.sample(16, generator=4)[:, :2]
    samples = model.sample(16, 32, generator=torch.Generator().manual_seed(5), prefix=prefix)
    assert lang.token_valid(samples).all()


# ---- every model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_logits_shape(config):
    model = fitted(config)
    assert model.logits(torch.randint(V, (3, 7))).shape == (3, 7, V)
    assert model.logits(torch.randint(V, (2, 1))).shape == (2, 1, V)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_changing_future_tokens_leaves_past_logits_alone(config):
    model = fitted(config)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(V, (4, 12), generator=gen)
    other = idx.clone()
    other[:, 6:] = torch.randint(V, (4, 6), generator=gen)
    with torch.no_grad():
        before, after = model.logits(idx), model.logits(other)
    torch.testing.assert_close(before[:, :6], after[:, :6], rtol=0, atol=1e-6)
    if not (isinstance(config, NGramConfig) and config.order == 1):
        assert not torch.allclose(before[:, 6:], after[:, 6:])  # and the present does matter


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_seeded_build_and_sample_are_deterministic(config):
    a, b = fitted(config, seed=3), fitted(config, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    sa = a.sample(3, 10, generator=torch.Generator().manual_seed(7))
    sb = b.sample(3, 10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(sa, sb) and sa.shape == (3, 10) and 0 <= sa.min() and sa.max() < V


def test_sample_keeps_the_prefix():
    model = fitted(RNNConfig(vocab=V, n_embd=4, n_hidden=8))
    out = model.sample(2, 6, generator=torch.Generator().manual_seed(0), prefix=torch.tensor([4, 3, 2]))
    assert out.shape == (2, 6) and out[:, :3].tolist() == [[4, 3, 2]] * 2
    with pytest.raises(ValueError, match="prefix must be"):
        model.sample(2, 2, prefix=torch.tensor([4, 3, 2]))


@pytest.mark.parametrize("config", CONFIGS[3:], ids=IDS[3:])
def test_seeded_training_is_deterministic(config):
    rows = torch.randint(V, (64, 12), generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        model = build_model(config, seed=1)
        runs.append((train_lm(model, row_batches(rows, 8), steps=5, seed=2), model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(x, y) for x, y in zip(runs[0][1].values(), runs[1][1].values()))


# ---- the recurrent cells against torch's ---------------------------------------------------------
@pytest.mark.parametrize(
    "ours, theirs",
    [(ElmanCell, nn.RNNCell), (LSTMCell, nn.LSTMCell), (GRUCell, nn.GRUCell)],
    ids=["rnn", "lstm", "gru"],
)
def test_cells_match_torch(ours, theirs):
    torch.manual_seed(0)
    ref = theirs(6, 5).double()
    cell = ours(6, 5).double()
    cell.load_state_dict(ref.state_dict())  # same names, same layout
    x, h, c = torch.randn(3, 6).double(), torch.randn(3, 5).double(), torch.randn(3, 5).double()
    if ours is LSTMCell:
        torch.testing.assert_close(cell(x, (h, c)), ref(x, (h, c)))
    else:
        torch.testing.assert_close(cell(x, (h,))[0], ref(x, h))


@pytest.mark.parametrize("cell_class", [ElmanCell, LSTMCell, GRUCell], ids=["rnn", "lstm", "gru"])
def test_each_cells_scan_is_the_plain_loop(cell_class):
    """The hoisted-projection scan of each cell = one call of the cell per position, values and grads."""
    torch.manual_seed(0)
    cell = cell_class(6, 5).double()
    x = torch.randn(3, 7, 6, dtype=torch.double, requires_grad=True)
    state = tuple(torch.randn(3, 5, dtype=torch.double) for _ in cell.init_state(3))
    runs = []
    for scan in (cell.scan, lambda x, s: _Cell.scan(cell, x, s)):
        hidden = scan(x, state)
        grads = torch.autograd.grad(hidden.square().sum(), [x, *cell.parameters()])
        runs.append((hidden, grads))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=1e-12)
    for ours, plain in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12)


# ---- training ------------------------------------------------------------------------------------
def test_bengio_mlp_learns_the_trigram_rule():
    lang = RuleLanguage(RuleSpec(n=3))
    model = build_model(NeuralNGramConfig(vocab=4, context=2), seed=0)
    losses = train_lm(model, row_batches(lang.sample(1000, generator=1), 32), steps=200, lr=1e-2)
    assert losses[-1] < losses[0]
    assert model.nll(lang.sample(200, generator=2)) < lang.entropy_bound() + 0.05


@pytest.mark.parametrize(("schedule", "expected"), [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    ("cosine", [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]),  # 1, 0.854, 0.5, 0.146
])
def test_learning_rate_schedules(monkeypatch, schedule, expected):
    seen, step = [], torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    rows = torch.randint(V, (16, 8), generator=torch.Generator().manual_seed(0))
    train_lm(build_model(RNNConfig(vocab=V), seed=0), row_batches(rows, 4), steps=4, lr=2e-3, schedule=schedule)
    assert seen == pytest.approx([2e-3 * e for e in expected], rel=1e-12)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule must be one of constant, cosine"):
        train_lm(build_model(RNNConfig(vocab=V), seed=0), row_batches(torch.zeros(4, 4, dtype=torch.long), 2),
                 steps=1, schedule="linear")


def test_window_batches_are_contiguous_slices():
    stream = torch.arange(100)
    batch = window_batches(stream, 4, 10)(torch.Generator().manual_seed(0))
    assert batch.shape == (4, 10) and (batch.diff(dim=1) == 1).all()


def test_unknown_cell_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"\['gru', 'lstm', 'rnn'\]"):
        RNNConfig(vocab=3, cell="transformer")


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_recurrent_models_learn_the_4gram_rule(cell):
    """Fresh samples every step (a fixed set of 2,000 rows gets memorised by the LSTM and GRU)."""
    lang = RuleLanguage(RuleSpec(n=4))
    model = build_model(RNNConfig(vocab=4, cell=cell), seed=0)
    train_lm(model, lambda gen: lang.sample(32, gen), steps=1000, lr=1e-2)
    nll = model.nll(lang.sample(500, generator=2))
    assert nll < lang.entropy_bound() + 0.05  # far below log 4 = 1.386, the best with 2 tokens of context
