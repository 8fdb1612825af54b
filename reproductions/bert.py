"""BERT from scratch: a bidirectional Transformer encoder pretrained by masked language modelling.

Paper: J. Devlin, M.-W. Chang, K. Lee, K. Toutanova, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding", NAACL 2019 (arXiv:1810.04805).

What differs from the original Transformer encoder (Vaswani et al. 2017, `transformer.py`):
  * learned absolute position embeddings instead of fixed sinusoids;
  * segment ("token type") embeddings, added to token and position embeddings, so one input can
    hold a sentence pair "[CLS] A [SEP] B [SEP]";
  * LayerNorm (eps 1e-12) applied to the summed embeddings, then post-LN blocks as in the
    Transformer: x = LN(x + Sublayer(x));
  * GELU (the exact, erf form; Hendrycks & Gimpel 2016) instead of ReLU in the feed-forward;
  * a pooler, tanh(W h_[CLS] + b), giving one vector per sequence for classification;
  * pretraining by masked-LM (predict 15% masked tokens, decoder tied to the token embeddings)
    plus next-sentence prediction, then fine-tuning with a small task head.

What differs from GPT (Radford et al. 2018, `gpt1.py`): attention is bidirectional. There is no
causal mask; the only mask hides padding keys. So BERT cannot generate text left to right, but
every position sees the whole input, which is what classification wants.

Module and parameter names follow the original checkpoints (and `transformers.BertModel`), so
loading one is a near-identity name map: see `from_hf` and `to_hf_state_dict`, which all three
models (BertModel, BertForSequenceClassification, BertForMaskedLM) share.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reproductions.common import CheckpointMismatchError, check_state_dict

# The reference of the bare encoder: transformers.BertModel. The classifier's reference is
# transformers.BertForSequenceClassification and the masked LM's transformers.BertForMaskedLM.
HF_CLASS = "BertModel"

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522  # WordPiece vocabulary of the released uncased models
    hidden_size: int = 768  # H in the paper
    num_hidden_layers: int = 12  # L
    num_attention_heads: int = 12  # A
    intermediate_size: int = 3072  # feed-forward width, 4H in the paper
    max_position_embeddings: int = 512  # learned positions: the longest input the model accepts
    type_vocab_size: int = 2  # segments A and B
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2  # classifier outputs; 1 means regression (STS-B)
    initializer_range: float = 0.02  # std of the normal init of weights
    classifier_dropout: float | None = None  # None: use hidden_dropout_prob

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> BertConfig:
        if name not in name_to_config:
            raise ValueError(f"unknown BERT config {name!r}; known: {', '.join(sorted(name_to_config))}")
        return cls(**{**name_to_config[name], **overrides})

    @classmethod
    def from_hf(cls, hf_config: Any) -> BertConfig:
        """Read a `transformers.BertConfig`; refuse variants this reproduction does not implement."""
        act = getattr(hf_config, "hidden_act", "gelu")
        pos = getattr(hf_config, "position_embedding_type", "absolute")
        if act != "gelu" or pos != "absolute":
            raise ValueError(
                f"cannot reproduce hidden_act={act!r} with position_embedding_type={pos!r}: only "
                "hidden_act='gelu' with absolute positions is implemented"
            )
        names = [f.name for f in fields(cls) if f.name != "num_labels"]
        return cls(
            **{n: getattr(hf_config, n) for n in names if hasattr(hf_config, n)},
            num_labels=hf_config.num_labels,
        )

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the equivalent `transformers.BertConfig`."""
        return dict(**asdict(self), hidden_act="gelu", position_embedding_type="absolute")


name_to_config: dict[str, dict[str, Any]] = {
    # A test-sized model: same architecture, small enough for CPU unit tests.
    "tiny": dict(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    ),
    # MiniLM-L6-H384 (Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
    # Compression of Pre-Trained Transformers", arXiv:2002.10957); the config of the
    # nreimers/MiniLM-L6-H384-uncased checkpoint that sentence-transformers/all-MiniLM-L6-v2 fine-tunes.
    "minilm-l6-h384": dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    ),
    # BERT-BASE: L=12, H=768, A=12, FFN 4H, 110M parameters (Devlin et al. 2019, Section 3).
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    # BERT-LARGE: L=24, H=1024, A=16, FFN 4H, 340M parameters (Devlin et al. 2019, Section 3).
    "bert-large": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
}


# ---------------------------------------------------------------------------------------------
# Modules (names match the original checkpoints)
# ---------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """token + learned position + segment embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        H = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, H)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, H)
        self.LayerNorm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.size(1)
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, H)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over the whole sequence (no causal mask)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        H = config.hidden_size
        self.n_head = config.num_attention_heads
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape
        split = lambda t: t.view(B, T, self.n_head, H // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        p = self.dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, H)


class BertSelfOutput(nn.Module):
    """Projection after attention, dropout, then post-LN residual: LN(x + dense(y))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(y)))


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)  # the checkpoint's name: attention.self.query ...
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(nn.Module):
    """First feed-forward layer: H -> intermediate_size, exact (erf) GELU."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # approximate="none": the erf form used by BERT


class BertFeedForwardOutput(nn.Module):
    """Second feed-forward layer back to H, dropout, post-LN residual (the checkpoint's `output`)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertFeedForwardOutput(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        for block in self.layer:
            x = block(x, key_mask)
        return x


class BertPooler(nn.Module):
    """tanh(dense(h_[CLS])): the sequence summary the paper feeds to classifiers (its C vector)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, H)


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) 1 = token, 0 = padding -> boolean (B, 1, 1, T) mask of keys each query may attend to."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


def _embed_and_encode(
    model: BertModel | BertBackbone,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
) -> torch.Tensor:
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)  # everything is segment A
    x = model.embeddings(input_ids, token_type_ids)  # (B, T, H)
    return model.encoder(x, padding_mask(attention_mask))  # (B, T, H)


def _init_weights(module: nn.Module, std: float) -> None:
    """BERT's init: N(0, 0.02) weights, zero biases, unit LayerNorm; the padding embedding is zero."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class BertOutput:
    last_hidden_state: torch.Tensor  # (B, T, H)
    pooler_output: torch.Tensor  # (B, H)

    def __iter__(self) -> Iterator[torch.Tensor]:  # lets callers write `hidden, pooled = model(...)`
        return iter((self.last_hidden_state, self.pooler_output))


class HFConversion:
    """`from_hf` and `to_hf_state_dict`, shared by BertModel, BertForSequenceClassification and
    BertForMaskedLM (the conversion itself is at the end of this file)."""

    @classmethod
    def from_hf(cls, hf_config: Any, state_dict: Mapping[str, torch.Tensor], *, strict_head: bool = True):
        """A model holding a Hugging Face BERT checkpoint, its config read by `BertConfig.from_hf`.

        Accepts bare `BertModel` keys (`embeddings...`) and task-model keys (`bert.embeddings...`,
        `classifier.weight`, `cls.predictions...`), ignoring buffers such as `embeddings.position_ids`.
        Raises CheckpointMismatchError naming missing/unexpected keys and shape mismatches.

        strict_head=False: tensors above the encoder (pooler, classifier, cls.*) may be missing from the
        checkpoint, keeping the model's own init, and heads the model lacks are dropped; this is how a
        classifier is built from a bare encoder checkpoint. Embeddings and encoder must match.
        """
        model = cls(BertConfig.from_hf(hf_config))
        _load_hf(model, state_dict, strict_head)
        return model

    def to_hf_state_dict(self, tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """This model's tensors (cloned), or `tensors` keyed like them (e.g. gradients, possibly only
        some), as the matching `transformers` class loads them with `load_state_dict(strict=True)`."""
        return _to_hf(self, tensors)


class BertModel(HFConversion, nn.Module):
    """The encoder with its pooler: what a bare BERT checkpoint holds."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(lambda m: _init_weights(m, config.initializer_range))

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T), 1 = token, 0 = padding
        token_type_ids: torch.Tensor | None = None,  # (B, T), segment 0 or 1
    ) -> BertOutput:
        hidden = _embed_and_encode(self, input_ids, attention_mask, token_type_ids)
        return BertOutput(last_hidden_state=hidden, pooler_output=self.pooler(hidden))


class BertBackbone(nn.Module):
    """Embeddings + encoder without the pooler: the `bert` inside the masked-LM model."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _embed_and_encode(self, input_ids, attention_mask, token_type_ids)  # (B, T, H)


class BertForSequenceClassification(HFConversion, nn.Module):
    """Fine-tuning head of Section 4.1: dropout then a linear layer on the pooled [CLS] vector."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        p = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        _init_weights(self.classifier, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pooled = self.bert(input_ids, attention_mask, token_type_ids).pooler_output  # (B, H)
        return self.classifier(self.dropout(pooled))  # (B, num_labels)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean-squared error when there is one output (regression, STS-B), else cross-entropy."""
    if logits.size(-1) == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """Masked-LM output: transform, then a decoder tied to the word embeddings plus its own bias."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # weight tying
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias  # (B, T, V)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden)


class BertForMaskedLM(HFConversion, nn.Module):
    """The masked-LM half of pretraining (Section 3.1, Task #1); NSP is not reproduced."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertBackbone(config)
        self.cls = BertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)
        self.apply(lambda m: _init_weights(m, config.initializer_range))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.cls(self.bert(input_ids, attention_mask, token_type_ids))  # (B, T, V)


AnyBert = BertModel | BertForSequenceClassification | BertForMaskedLM


# ---------------------------------------------------------------------------------------------
# Conversion to and from Hugging Face checkpoints
# ---------------------------------------------------------------------------------------------

# Buffers and aliases some checkpoints carry that are not parameters here.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids", "cls.predictions.decoder.bias")
_BODY_PREFIXES = ("embeddings.", "encoder.")  # everything else (pooler, classifier, cls.*) is "head"
_TIED_DECODER, _WORD_EMB = "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"


def _normalise_keys(hf_sd: Mapping[str, torch.Tensor], bare: bool) -> dict[str, torch.Tensor]:
    """Drop buffers/aliases, rename TF-era gamma/beta, and add or strip the `bert.` prefix."""
    out = {}
    for key, tensor in hf_sd.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if bare and key.startswith("bert."):
            key = key.removeprefix("bert.")
        elif not bare and key.startswith(_BODY_PREFIXES + ("pooler.",)):
            key = "bert." + key
        out[key] = tensor
    return out


def _is_head(key: str) -> bool:
    return not key.removeprefix("bert.").startswith(_BODY_PREFIXES)


def _fill_heads(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """strict_head=False: drop checkpoint heads the model lacks; keep the model's own init for the rest."""
    own = model.state_dict()
    for key in [k for k in sd if _is_head(k) and k not in own]:
        del sd[key]
    sd.update({k: own[k] for k in own if _is_head(k) and k not in sd})


def _tie_decoder(sd: dict[str, torch.Tensor], source: str) -> None:
    """The MLM decoder is the word-embedding matrix; safetensors files often store it only once."""
    if _WORD_EMB not in sd:
        return
    decoder = sd.setdefault(_TIED_DECODER, sd[_WORD_EMB])
    if decoder.shape == sd[_WORD_EMB].shape and not torch.equal(decoder, sd[_WORD_EMB]):
        raise CheckpointMismatchError(
            f"{source}: {_TIED_DECODER} differs from {_WORD_EMB}; this model ties them"
        )


def _load_hf(model: AnyBert, hf_sd: Mapping[str, torch.Tensor], strict_head: bool) -> None:
    """Copy a Hugging Face BERT state dict into `model` (any of the three classes), in place."""
    source = "HF BERT checkpoint"
    sd = _normalise_keys(hf_sd, bare=isinstance(model, BertModel))
    if isinstance(model, BertForMaskedLM):
        _tie_decoder(sd, source)
    if not strict_head:
        _fill_heads(model, sd)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, sd, source)
    model.load_state_dict(sd, strict=True)


def _to_hf(model: AnyBert, tensors: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    if tensors is None:
        sd = {k: v.detach().clone() for k, v in own.items()}
    else:
        check_state_dict({k: v.shape for k, v in own.items()}, tensors, "BERT tensors", allow_missing=True)
        sd = dict(tensors)
    if "cls.predictions.bias" in sd:
        sd.setdefault("cls.predictions.decoder.bias", sd["cls.predictions.bias"])  # HF keeps a tied alias
    return sd


def num_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied MLM decoder is counted once)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "HF_CLASS",
    "HFConversion",
    "BertConfig",
    "name_to_config",
    "BertOutput",
    "BertModel",
    "BertBackbone",
    "BertForSequenceClassification",
    "BertForMaskedLM",
    "sequence_classification_loss",
    "padding_mask",
    "num_parameters",
    "CheckpointMismatchError",
]
