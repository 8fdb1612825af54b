"""Any harness model as an lm-eval `LM`, registered in lm-eval's model registry as `harness`.

    import harness.lm_eval_bridge  # registers `harness`
    lm_eval.simple_evaluate(model="harness", model_args="name=gpt2-scratch,weights=random:tiny", tasks=[...])

`HarnessLM` wraps a built `ModelAdapter` (scratch, reference, or a user's file) and answers lm-eval's
three request types (lm_eval/api/model.py) the way lm-eval's Hugging Face backend
(`lm_eval.models.huggingface.HFLM`, 0.4.x) does, so the same weights give the same numbers:

- `loglikelihood((context, continuation))`: trailing spaces of the context move to the
  continuation; the continuation's tokens are `encode(context + continuation)` after the first
  `len(encode(context))`; an empty context becomes the prefix token (BOS, else end-of-text) unless
  the continuation already starts with it. The model reads the last `max_length` tokens of
  `context + continuation` minus the final token; the answer is the sum of the continuation's
  log-probabilities and whether greedy decoding reproduces it (needs the `logits` capability).
- `loglikelihood_rolling((text,))`: the text's tokens in disjoint windows of `max_length`, the first
  conditioned on the prefix token, each later one on the full `max_length` tokens before it (so the
  last window overlaps its predecessor but scores only new tokens); per-document sums.
- `generate_until((context, gen_kwargs))`: the context left-truncated to `max_length - max_gen_toks`
  tokens, `max_gen_toks` tokens decoded greedily (seeded sampling if `do_sample`), cut at the first
  end-of-text token and then at the first occurrence of any `until` string. Greedy decoding is
  deterministic, so decoding `max_gen_toks` tokens and cutting gives the text that stopping early
  (as HFLM's stopping criteria do) gives.

lm-eval 0.4.13 has no plugin entry points, and `lm_eval.api.registry.get_model` imports
`lm_eval.models` (the built-in backends) only while the registry is empty: importing it here first
keeps `hf` and friends available next to `harness`. For lm-eval's own command line:

    python -m harness.lm_eval_bridge --model harness --model_args name=gpt2-scratch,weights=random:tiny \\
        --tasks harness_sst2 --include_path tasks/lm_eval --limit 20 --device cpu
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import lm_eval.models  # noqa: F401  (the built-in backends first: see the module docstring)
import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.utils import normalize_gen_kwargs

from harness.api import (
    MODELS,
    Capability,
    Generator,
    HarnessError,
    ModelAdapter,
    ModelSpec,
    check_device,
    load_weights,
)

REGISTRY_NAME = "harness"
DEFAULT_MAX_GEN_TOKS = 256  # HFLM.max_gen_toks
MODEL_ARGS = ("name", "weights", "reference", "seed", "device", "batch_size", "max_batch_size", "max_length",
              "max_gen_toks")

Window = tuple[list[int], int]  # (ids, n): the model reads ids[:-1]; the last n of ids[1:] are scored


def model_spec(name: str, reference: str | None = None) -> ModelSpec:
    """The registry entry for `name`: a registered model, or a user's `file.py:NAME` /
    `package.module:NAME` held to `reference` (docs/bring-your-own.md)."""
    return MODELS.resolve(name, reference)


def build_model(name: str, weights: str | None = None, seed: int = 0, device: str = "cpu",
                reference: str | None = None) -> ModelAdapter:
    """Build a model on its weights exactly as `harness run` does (seeded, one-line errors)."""
    spec = model_spec(name, reference)
    check_device(device)
    resolved = load_weights(spec.arch, weights, seed)
    torch.manual_seed(seed)
    return spec.build(resolved, device)


class HarnessLM(LM):
    """lm-eval's `LM` over a harness `ModelAdapter`.

    Built either from lm-eval's `model_args` (`name`, `weights`, `reference`, `seed`, `device`,
    `batch_size`, `max_length`, `max_gen_toks`), or around an adapter already built:
    `HarnessLM(model=adapter, batch_size=8)`.
    """

    def __init__(self, model: ModelAdapter | None = None, *, name: str | None = None, weights: str | None = None,
                 reference: str | None = None, seed: int = 0, device: str | None = None, batch_size: Any = 1,
                 max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, track: Callable | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise HarnessError(f"model_args: unknown key(s) {', '.join(sorted(unknown))} for model 'harness'; "
                               f"known: {', '.join(MODEL_ARGS)}")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.seed = int(seed)
        if model is None:
            if not name:
                raise HarnessError("model_args: give name=MODEL (e.g. name=gpt2-scratch,weights=random:tiny)")
            model = build_model(str(name), None if weights is None else str(weights), self.seed, device or "cpu",
                                None if reference is None else str(reference))
        self.model = model
        self._device = model.device
        self.tokenizer = model.tokenizer
        self._max_length = model.max_length if max_length is None else _positive_int(max_length, "max_length")
        if self._max_length > model.max_length:
            raise HarnessError(f"model_args: max_length={self._max_length} exceeds {model.name}'s maximum "
                               f"{model.max_length}")
        self.track = track or (lambda items, total=None, description="": items)

    # -- what lm-eval reads --------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def prefix_token_id(self) -> int:
        """BOS where the tokenizer has one, else end-of-text: HFLM.prefix_token_id."""
        return self.tokenizer.prefix_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    # -- loglikelihood ---------------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) by lm-eval's rule (TemplateLM.loglikelihood / _encode_pair)."""
        if not context:
            cont = self.tokenizer.encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        # A context of only whitespace leaves nothing to condition on (HFLM fails an assert): the prefix token.
        return ctx or [self.prefix_token_id], whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not self.model.can(Capability.LOGITS):
            raise HarnessError(f"model '{self.model.name}' cannot 'logits', which lm-eval's loglikelihood requests "
                               "need (is-greedy needs the argmax); loglikelihood_rolling tasks need only 'score'")
        windows = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self.encode_pair(context, continuation)
            if not cont or len(cont) > self.max_length:
                raise HarnessError(f"lm-eval request {continuation!r}: the continuation has {len(cont)} tokens; "
                                   f"it needs 1 to max_length={self.max_length}")
            windows.append(((ctx + cont)[-(self.max_length + 1):], len(cont)))
        return self._score(windows, greedy=True, description="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        per_doc = [rolling_windows(self.tokenizer.encode(req.args[0]), self.prefix_token_id, self.max_length)
                   for req in requests]
        flat = [w for windows in per_doc for w in windows]
        greedy = self.model.can(Capability.LOGITS)
        scores = iter(self._score(flat, greedy=greedy, description="loglikelihood_rolling"))
        return [sum(next(scores)[0] for _ in windows) for windows in per_doc]

    def _score(self, windows: list[Window], greedy: bool, description: str) -> list[tuple[float, bool]]:
        """(sum of log p over each window's last n targets, whether they are all the argmax), batched
        longest first (little padding), answered in the order given."""
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        out: list[tuple[float, bool]] = [(math.nan, False)] * len(windows)
        for batch in self.track(batches, total=len(batches), description=f"lm-eval {description}"):
            for i, answer in zip(batch, self._score_batch([windows[i] for i in batch], greedy)):
                out[i] = answer
        return out

    @torch.no_grad()
    def _score_batch(self, batch: list[Window], greedy: bool) -> list[tuple[float, bool]]:
        width = max(len(ids) for ids, _ in batch)
        padded = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            padded[row, : len(ids)] = torch.tensor(ids)
        x, y = padded[:, :-1].contiguous().to(self.device), padded[:, 1:].contiguous().to(self.device)
        # Right padding, no mask: causal attention keeps it from every real position (as HFLM does).
        if not greedy:  # a model that only scores: log p of the targets, no argmax to compare
            logprobs = self.model.token_logprobs(x, y)  # (B, width - 1)
            return [(float(logprobs[r, len(ids) - 1 - n: len(ids) - 1].sum()), False)
                    for r, (ids, n) in enumerate(batch)]
        logits = self.model.logits(x)  # (B, width - 1, V)
        answers = []
        for row, (ids, n) in enumerate(batch):
            scored = slice(len(ids) - 1 - n, len(ids) - 1)  # the last n real positions of this row
            logprobs = F.log_softmax(logits[row, scored].float(), dim=-1)  # (n, V)
            targets = y[row, scored]
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            answers.append((float(picked.sum()), bool((logprobs.argmax(-1) == targets).all())))
        return answers

    # -- generate_until --------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        generator = self.model.require(Generator, task="lm-eval generate_until")
        out = []
        for i, req in enumerate(self.track(requests, total=len(requests), description="lm-eval generate_until")):
            context, gen_kwargs = req.args
            out.append(self._generate_one(generator, context, dict(gen_kwargs), seed=self.seed + i))
        return out

    def _generate_one(self, generator: Generator, context: str, gen_kwargs: dict, seed: int) -> str:
        kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until, n = stop_strings(kw.pop("until")), int(kw.pop("max_gen_toks"))
        sampling = {k: kw.pop(k) for k in ("temperature", "top_k", "top_p") if k in kw}
        do_sample = bool(kw.pop("do_sample", False))
        if kw:
            raise HarnessError(f"generation_kwargs {', '.join(sorted(kw))}: not supported by model 'harness' "
                               "(it takes until, max_gen_toks, do_sample, temperature, top_k, top_p)")
        room = self.max_length - n
        if room < 1:
            raise HarnessError(f"max_gen_toks={n} leaves no room for a context in max_length={self.max_length}")
        ids = self.tokenizer.encode(context)[-room:] or [self.prefix_token_id]
        temperature = float(sampling.get("temperature") or 0.0) if do_sample else 0.0
        new = generator.generate(ids, n, temperature=temperature, top_k=sampling.get("top_k"),
                                 top_p=sampling.get("top_p"), seed=seed)
        return cut(self._decode(_before_eot(new, self.tokenizer.eot_id)), until)

    def _decode(self, ids: list[int]) -> str:
        """Text of ids without special tokens (HFLM decodes with skip_special_tokens=True)."""
        backend = getattr(self.tokenizer, "backend", None)
        return backend.decode(ids, skip_special_tokens=True) if backend is not None else self.tokenizer.decode(ids)


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[Window]:
    """Disjoint scoring windows over `tokens` (lm_eval.utils.get_rolling_token_windows with
    context_len=1, made disjoint): every token scored once, the first conditioned on `prefix`, each
    later window reading the full `max_length` tokens before its last target."""
    seq = [prefix, *tokens]  # seq[i] predicts seq[i + 1] = tokens[i]
    windows, done = [], 0
    while done < len(tokens):
        end = min(len(tokens), done + max_length)
        windows.append((seq[max(0, end - max_length): end + 1], end - done))
        done = end
    return windows


def stop_strings(until: str | list[str] | None) -> list[str]:
    if isinstance(until, str):
        return [until]
    return [s for s in (until or []) if isinstance(s, str)]


def cut(text: str, until: Iterable[str]) -> str:
    """Text before the first occurrence of any stop string (lm-eval's postprocess_generated_text)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _before_eot(ids: list[int], eot: int) -> list[int]:
    return ids[: ids.index(eot)] if eot in ids else ids


def _positive_int(value: Any, key: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or (isinstance(value, float) and not value.is_integer()):
        raise HarnessError(f"model_args: {key}={value!r} must be a positive whole number"
                           + (" ('auto' is not supported)" if str(value).startswith("auto") else ""))
    return number


def register() -> None:
    """Register `HarnessLM` as lm-eval's model `harness` (once; idempotent)."""
    if model_registry.get(REGISTRY_NAME, None) is not HarnessLM:
        register_model(REGISTRY_NAME)(HarnessLM)


def cli(argv: list[str] | None = None) -> None:
    """lm-eval's own command line (`lm-eval run ...`), with the model `harness` registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":  # python -m harness.lm_eval_bridge ...: register the importable copy, not __main__'s
    from harness import lm_eval_bridge

    lm_eval_bridge.cli()
else:
    register()
