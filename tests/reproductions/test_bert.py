"""BERT from scratch vs `transformers`: tiny-config parity, gradients, conversion errors.

The real MiniLM checkpoint (found and read by harness/models/bert.py) is tested in
tests/harness/test_bert_models.py."""

from __future__ import annotations

import pytest
import torch
import transformers

from reproductions import bert
from reproductions.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    CheckpointMismatchError,
    name_to_config,
)

ATOL = 1e-5  # fp32, same op order up to the attention kernel: observed differences are ~1e-8 on tiny

def _perturbed(hf_model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every tensor so zero biases and unit LayerNorms cannot hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return hf_model.eval()


def hf_config(config: BertConfig) -> transformers.BertConfig:
    return transformers.BertConfig(**config.to_hf_kwargs())


def _hf(cls: type, config: BertConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _perturbed(cls(hf_config(config)), seed)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """A padded batch of sentence pairs: rows 1 and 2 end in padding; segment B starts at position 4."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 1000, (3, 9), generator=g)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 3:] = 0
    input_ids[attention_mask == 0] = 0  # [PAD]
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 4:] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def _args(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


# --- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(name_to_config), ids=sorted(name_to_config))
def test_config_round_trips_through_hf(name: str) -> None:
    cfg = BertConfig.from_name(name)
    assert BertConfig.from_hf(hf_config(cfg)) == cfg


def test_from_name_overrides_and_unknown_names() -> None:
    assert BertConfig.from_name("tiny", num_labels=1).num_labels == 1
    with pytest.raises(ValueError, match="known: bert-base, bert-large, minilm-l6-h384, tiny"):
        BertConfig.from_name("bert-huge")


def test_from_hf_refuses_variants_not_reproduced() -> None:
    with pytest.raises(ValueError, match="relu"):
        BertConfig.from_hf(transformers.BertConfig(hidden_act="relu"))


# --- 1. tiny config: forward parity with transformers ------------------------------------------


def test_bert_model_matches_hf_on_padded_pairs(batch: dict[str, torch.Tensor]) -> None:
    cfg = BertConfig.from_name("tiny")
    hf = _hf(transformers.BertModel, cfg)
    ours = BertModel.from_hf(hf.config, hf.state_dict()).eval()
    with torch.no_grad():
        expected = hf(**batch)
        got = ours(*_args(batch))
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=ATOL)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=0, atol=ATOL)
    hidden, pooled = got  # BertOutput also unpacks like a tuple
    assert hidden.shape == (3, 9, 32) and pooled.shape == (3, 32)


@pytest.mark.parametrize("num_labels", [2, 1], ids=["classification", "regression"])
def test_sequence_classification_matches_hf(batch: dict[str, torch.Tensor], num_labels: int) -> None:
    cfg = BertConfig.from_name("tiny", num_labels=num_labels)
    hf = _hf(transformers.BertForSequenceClassification, cfg)
    ours = BertForSequenceClassification.from_hf(hf.config, hf.state_dict()).eval()
    with torch.no_grad():
        expected = hf(**batch).logits
        got = ours(*_args(batch))
    assert got.shape == (3, num_labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_masked_lm_matches_hf_and_ties_decoder(batch: dict[str, torch.Tensor]) -> None:
    cfg = BertConfig.from_name("tiny")
    hf = _hf(transformers.BertForMaskedLM, cfg)
    ours = BertForMaskedLM.from_hf(hf.config, hf.state_dict()).eval()
    with torch.no_grad():
        expected = hf(**batch).logits
        got = ours(*_args(batch))
    assert got.shape == (3, 9, cfg.vocab_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize(
    "ours_cls, hf_cls",
    [
        (BertModel, transformers.BertModel),
        (BertForSequenceClassification, transformers.BertForSequenceClassification),
        (BertForMaskedLM, transformers.BertForMaskedLM),
    ],
    ids=["model", "sequence-classification", "masked-lm"],
)
def test_to_hf_state_dict_loads_strictly_into_transformers(ours_cls: type, hf_cls: type) -> None:
    cfg = BertConfig.from_name("tiny")
    torch.manual_seed(3)
    ours = ours_cls(cfg)
    hf = hf_cls(hf_config(cfg))
    hf.load_state_dict(ours.to_hf_state_dict(), strict=True)
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(hf.state_dict()[name], tensor, rtol=0, atol=0)


# --- 2. gradients ------------------------------------------------------------------------------


def test_gradients_match_hf(batch: dict[str, torch.Tensor]) -> None:
    cfg = BertConfig.from_name("tiny")
    hf = _hf(transformers.BertForSequenceClassification, cfg)
    # eval: dropout off, so both see the same function
    ours = BertForSequenceClassification.from_hf(hf.config, hf.state_dict()).eval()
    labels = torch.tensor([0, 1, 1])
    expected = hf(**batch, labels=labels).loss
    got = bert.sequence_classification_loss(ours(*_args(batch)), labels)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=0, atol=ATOL, msg=name)


# --- 3. checkpoint mismatches and head handling ------------------------------------------------


def _left_at_init(
    model: torch.nn.Module, checkpoint: dict[str, torch.Tensor], init: dict[str, torch.Tensor], rename
) -> list[str]:
    """Names of `model`'s tensors that are not in `checkpoint` (under `rename(name)`), having checked
    that every other tensor is the checkpoint's and that each of these still holds its value in `init`."""
    kept = []
    for name, tensor in model.state_dict().items():
        if rename(name) in checkpoint:
            torch.testing.assert_close(tensor, checkpoint[rename(name)], rtol=0, atol=0, msg=name)
        else:
            kept.append(name)
            torch.testing.assert_close(tensor, init[name], rtol=0, atol=0, msg=name)
    return sorted(kept)


def test_missing_key_is_named() -> None:
    cfg = BertConfig.from_name("tiny")
    sd = transformers.BertModel(hf_config(cfg)).state_dict()
    del sd["encoder.layer.1.attention.self.key.weight"]
    with pytest.raises(
        CheckpointMismatchError, match=r"missing keys \[encoder\.layer\.1\.attention\.self\.key"
    ):
        BertModel.from_hf(hf_config(cfg), sd)


def test_shape_mismatch_is_named() -> None:
    small = transformers.BertModel(hf_config(BertConfig.from_name("tiny"))).state_dict()
    wider = hf_config(BertConfig.from_name("tiny", intermediate_size=64))
    with pytest.raises(
        CheckpointMismatchError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight \(128, 32\)"
    ):
        BertModel.from_hf(wider, small)


def test_buffers_and_tf_style_layernorm_names_are_accepted() -> None:
    cfg = BertConfig.from_name("tiny")
    hf = _hf(transformers.BertModel, cfg)
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in hf.state_dict().items()}
    sd["embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    ours = BertModel.from_hf(hf.config, sd)
    torch.testing.assert_close(
        ours.embeddings.LayerNorm.weight, hf.embeddings.LayerNorm.weight, rtol=0, atol=0
    )


def test_classifier_from_bare_encoder_needs_strict_head_false() -> None:
    cfg = BertConfig.from_name("tiny")
    hf = _hf(transformers.BertModel, cfg)
    bare = hf.state_dict()  # keys `embeddings...`, no classifier
    with pytest.raises(
        CheckpointMismatchError, match=r"missing keys \[classifier\.bias, classifier\.weight\]"
    ):
        BertForSequenceClassification.from_hf(hf.config, bare)
    torch.manual_seed(7)
    init = BertForSequenceClassification(cfg).state_dict()
    torch.manual_seed(7)
    ours = BertForSequenceClassification.from_hf(hf.config, bare, strict_head=False)
    kept = _left_at_init(ours, bare, init, rename=lambda name: name.removeprefix("bert."))
    assert kept == ["classifier.bias", "classifier.weight"]  # seeded init kept, everything else loaded
    torch.testing.assert_close(ours.bert.pooler.dense.weight, bare["pooler.dense.weight"], rtol=0, atol=0)


def test_bare_model_rejects_classifier_head_unless_told() -> None:
    cfg = BertConfig.from_name("tiny")
    hf = _hf(transformers.BertForSequenceClassification, cfg)
    sd = hf.state_dict()  # keys `bert.embeddings...`
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \[classifier\.bias"):
        BertModel.from_hf(hf.config, sd)
    ours = BertModel.from_hf(hf.config, sd, strict_head=False)
    assert _left_at_init(ours, sd, {}, rename=lambda name: f"bert.{name}") == []


def test_masked_lm_from_bare_encoder_keeps_decoder_tied() -> None:
    cfg = BertConfig.from_name("tiny")
    hf = _hf(transformers.BertModel, cfg)
    bare = hf.state_dict()  # has a pooler, no cls.*
    torch.manual_seed(7)
    init = BertForMaskedLM(cfg).state_dict()
    torch.manual_seed(7)
    ours = BertForMaskedLM.from_hf(hf.config, bare, strict_head=False)
    tied = {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight"}
    kept = _left_at_init(ours, bare, init, rename=lambda name: tied.get(name, name.removeprefix("bert.")))
    assert kept == [
        "cls.predictions.bias",
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.dense.weight",
    ]
    decoder = ours.cls.predictions.decoder.weight
    torch.testing.assert_close(decoder, bare["embeddings.word_embeddings.weight"], rtol=0, atol=0)
    assert decoder is ours.bert.embeddings.word_embeddings.weight


def test_untied_decoder_is_rejected() -> None:
    cfg = BertConfig.from_name("tiny")
    hf = _hf(transformers.BertForMaskedLM, cfg)
    sd = dict(hf.state_dict())
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1.0
    with pytest.raises(CheckpointMismatchError, match="differs from bert.embeddings.word_embeddings.weight"):
        BertForMaskedLM.from_hf(hf.config, sd)


# --- 4. parameter counts at real sizes ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected", [("bert-base", 109_482_240), ("bert-large", 335_141_888)], ids=["base", "large"]
)
def test_parameter_counts_match_hf(name: str, expected: int) -> None:
    cfg = BertConfig.from_name(name)
    with torch.device("meta"):
        ours = BertModel(cfg)
        reference = transformers.BertModel(hf_config(cfg))
    assert bert.num_parameters(ours) == sum(p.numel() for p in reference.parameters()) == expected
