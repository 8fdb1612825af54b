"""The encoder-decoder pair: `transformer-scratch` (reproductions/transformer.py) and `transformer-hf`
(transformers.MarianMTModel configured by `TransformerConfig.to_hf_kwargs`, i.e. Transformer-base/big of
Vaswani et al. 2017, "Attention Is All You Need").

Weights (`--weights`): `random[:SIZE]` with the sizes of `reproductions.transformer.name_to_config`
(tiny, base, big; default `random:tiny`), or an HF-format MarianMTModel directory whose config this
reproduction can compute (ReLU, scaled and tied embeddings, equal encoder/decoder shapes, no
attention or activation dropout). Released opus-mt checkpoints use SiLU and an output bias, so
`transformer-scratch` refuses them with a one-line error.

Vocabulary: no subword model for translation ships offline, so random weights use a small
character vocabulary (`task_tokenizer`): 4 specials (<pad> 0, <s> 1 = decoder start, </s> 2 = end,
<unk> 3), digits, ASCII letters, space and common punctuation: 82 tokens, enough for the synthetic
`seq2seq` task and for parity's English prompt.

Capabilities:
  LOGITS    `logits(ids)` reads `ids` as the source *and* as the (already shifted) decoder input,
            so logits[:, t] predict decoder token t + 1: a next-token conditional LM, which lets
            the `parity` task compare logits and gradients through every encoder and decoder weight.
  GENERATE  `generate(prompt)` encodes the prompt as the source and decodes greedily from <s> for
            exactly `max_new_tokens` tokens (no early stop), with the KV cache of each side.
  SEQ2SEQ   `seq2seq_logits(src, src_mask, tgt_in)` for teacher-forced training, and
            `greedy_batch(sources, max_new_tokens)` -> target ids cut at </s>.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor
from transformers import GenerationConfig

from harness.api import (
    MODELS,
    ArchSpec,
    Capability,
    HarnessError,
    ModelAdapter,
    ModelInfo,
    ModelSpec,
    Weights,
    pad_right,
)
from harness.api.tokenizer import TextTokenizer
from reproductions import transformer
from reproductions.transformer import Transformer, TransformerConfig

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
PAD, BOS, EOS, UNK = range(len(SPECIALS))
CHARS = "0123456789+-=*/.,:;!?'\"() " + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
HF_MODEL = getattr(transformers, transformer.HF_CLASS)  # transformers.MarianMTModel


@lru_cache(maxsize=1)
def task_tokenizer() -> TextTokenizer:
    """One token per character (unknown characters -> <unk>); decoding concatenates the tokens."""
    vocab = {token: i for i, token in enumerate([*SPECIALS, *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[UNK]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIALS))
    return TextTokenizer(backend=backend, eot_id=EOS, pad_id=PAD, name="seq2seq-chars")


def _random_config(size: str, tokenizer: TextTokenizer) -> transformers.MarianConfig:
    cfg = TransformerConfig.from_name(size, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    return HF_MODEL.config_class(**cfg.to_hf_kwargs(bos_id=BOS, eos_id=tokenizer.eot_id))


class Seq2SeqAdapter(ModelAdapter):
    """What both implementations share; subclasses give `seq2seq_logits` and `decode_greedy`."""

    capabilities = frozenset({Capability.LOGITS, Capability.GENERATE, Capability.SEQ2SEQ})

    @property
    def max_length(self) -> int:
        return self.weights.hf_config.max_position_embeddings

    @property
    def bos_id(self) -> int:
        return self.weights.hf_config.decoder_start_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eot_id

    def seq2seq_logits(self, src: Tensor, src_mask: Tensor | None, tgt_in: Tensor) -> Tensor:
        """src (B, S) with src_mask (B, S), decoder input tgt_in (B, T) starting with <s> -> (B, T, V)."""
        raise NotImplementedError

    def decode_greedy(self, src: Tensor, src_mask: Tensor | None, max_new_tokens: int, eos_id: int | None) -> Tensor:
        """(B, 1 + n) ids starting with <s>; rows that produced eos_id continue with padding."""
        raise NotImplementedError

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        ids = input_ids.to(self.device)
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.seq2seq_logits(ids, mask, ids)

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=0):
        if temperature > 0:
            raise HarnessError(f"model '{self.name}' decodes greedily only; use temperature 0")
        src = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        return self.decode_greedy(src, None, max_new_tokens, eos_id=None)[0, 1:].tolist()

    @torch.no_grad()
    def greedy_batch(self, sources: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy targets for a batch of sources, each cut before its first </s>."""
        src, mask = pad_right(sources, self.tokenizer.pad_id, self.device)
        out = self.decode_greedy(src, mask, max_new_tokens, eos_id=self.eos_id)[:, 1:].tolist()
        return [row[: row.index(self.eos_id)] if self.eos_id in row else row for row in out]


class ScratchTransformer(Seq2SeqAdapter):
    def seq2seq_logits(self, src, src_mask, tgt_in):
        return self.module(src, tgt_in, src_mask)

    def decode_greedy(self, src, src_mask, max_new_tokens, eos_id):
        return self.module.generate(src, max_new_tokens, bos_id=self.bos_id, eos_id=eos_id, src_mask=src_mask)

    def reference_layout(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        # Marian names: `model.` + ours; its four tied copies of the embedding report one gradient.
        return self.module.to_hf_state_dict(tensors)


class HFTransformer(Seq2SeqAdapter):
    def seq2seq_logits(self, src, src_mask, tgt_in):
        return self.module(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt_in).logits

    @torch.no_grad()
    def decode_greedy(self, src, src_mask, max_new_tokens, eos_id):
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  decoder_start_token_id=self.bos_id, eos_token_id=eos_id,
                                  pad_token_id=self.tokenizer.pad_id)
        mask = torch.ones_like(src) if src_mask is None else src_mask
        return self.module.generate(input_ids=src, attention_mask=mask, generation_config=config)


def _build_scratch(info: ModelInfo, weights: Weights, device: str) -> ScratchTransformer:
    module = Transformer.from_hf(weights.hf_config, weights.state_dict)
    return ScratchTransformer(info, module, weights.tokenizer, weights, device)


def _build_hf(info: ModelInfo, weights: Weights, device: str) -> HFTransformer:
    module = HF_MODEL(weights.hf_config)
    module.load_state_dict(weights.state_dict, strict=True)
    return HFTransformer(info, module, weights.tokenizer, weights, device)


ARCH = ArchSpec(name="transformer", hf_model_class=HF_MODEL, random_config=_random_config,
                sizes=lambda: list(transformer.name_to_config), tokenizer=task_tokenizer,
                default_weights="random:tiny", default_size="tiny")
SCRATCH = ModelInfo("transformer-scratch", "transformer", "scratch", reference="transformer-hf")
HF = ModelInfo("transformer-hf", "transformer", "hf", reference=None)
MODELS.add(SCRATCH.name, "Transformer (Vaswani et al. 2017), from scratch (reproductions/transformer.py)",
           ModelSpec(SCRATCH, ARCH, lambda w, d: _build_scratch(SCRATCH, w, d)))
MODELS.add(HF.name, "reference: transformers.MarianMTModel (Transformer-base/big config)",
           ModelSpec(HF, ARCH, lambda w, d: _build_hf(HF, w, d)))
