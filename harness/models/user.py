"""Bring your own reproduction: `--model PATH.py:NAME --reference REF` (docs/bring-your-own.md).

`NAME(hf_config) -> torch.nn.Module` is the user's factory; `hf_config` is the reference's transformers
config of the chosen `--weights`. The reference (`gpt2-hf`, `llama-hf`, `bert-hf`, ...) supplies the
architecture, the default weights and the tokenizer. This plugin registers a resolver with
`MODELS.resolve(name, reference)`, so every command (`run`, `generate`, `diagnose`) that resolves a
model accepts a user's file, a module (`package.module:NAME`) or an entry-point factory.

What the module must do: `forward(input_ids)` returns logits (B, T, V), a tuple whose first item is
the logits (nanoGPT's `(logits, loss)`), or an object with `.logits`; for an encoder reference (no LM
head, e.g. `bert-hf`) it returns the last hidden state (B, T, H) or an object with `.last_hidden_state`.
A forward that returns only the last position without targets (nanoGPT's inference shortcut) is
called with `targets=input_ids` for every full-sequence use, and checked against the shortcut. The
weights are placed by `harness.api.align` or by the file's own `load_reference_weights(module,
state_dict)`. The module needs no `generate`: `UserLM.generate` decodes with its own loop over
`forward` (no cache), which parity's greedy check then uses.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from harness.api import MODELS, Capability, HarnessError, ModelAdapter, ModelInfo, ModelSpec, Weights
from harness.api.align import Alignment, Placement, Slot, align, module_slots, reference_slots, tied_aliases
from harness.api.errors import first_line
from harness.api.weights import file_sha256
from reproductions.common import sample_next

DECODER_CAPABILITIES = frozenset({Capability.SCORE, Capability.LOGITS, Capability.GENERATE, Capability.TRAIN,
                                  Capability.CAUSAL_LM})
ENCODER_CAPABILITIES = frozenset({Capability.LOGITS, Capability.ENCODE})
LOADER = "load_reference_weights"
EXAMPLE = "examples/nanogpt_gpt2.py:build"


@dataclass(frozen=True)
class UserFactory:
    """A user's `NAME(hf_config)` and where it came from."""

    given: str  # --model as given
    factory: Callable[..., nn.Module]
    loader: Callable[[nn.Module, dict], object] | None  # the file's load_reference_weights, if any
    source: str  # the file or module it was read from
    sha256: str  # of that file


def is_user_model(name: str) -> bool:
    path, colon, attr = name.rpartition(":")
    return bool(colon and attr and path) or name in MODELS.factories


def resolve_user_model(name: str, reference: str | None) -> ModelSpec | None:
    """The resolver `MODELS.resolve` calls for names it does not know; None for other names."""
    if not is_user_model(name):
        return None
    ref = _reference_spec(name, reference)
    user = load_factory(name, MODELS.factories.get(name, name))
    info = ModelInfo(name, ref.info.arch, "user", reference=ref.info.name)
    return ModelSpec(info, ref.arch, lambda weights, device: build_user(info, user, ref, weights, device))


def _reference_spec(name: str, reference: str | None) -> ModelSpec:
    references = [e.name for e in MODELS if _is_reference(e.obj)]
    if reference is None:
        raise HarnessError(f"--model {name} needs --reference REF, the registered reference that supplies the "
                           f"architecture, weights and tokenizer (one of: {', '.join(references)})")
    if reference not in references:
        raise HarnessError(f"--reference {reference}: not a registered reference model; use one of: "
                           f"{', '.join(references)}")
    return MODELS.get(reference)


def _is_reference(spec: ModelSpec) -> bool:
    """A registered reference a user's decoder or encoder can be held to: a transformers model class
    that is not an encoder-decoder (seq2seq models take more than `forward(input_ids)`)."""
    config_class = getattr(spec.arch.hf_model_class, "config_class", None)
    if spec.info.reference is not None or spec.info.impl != "hf" or config_class is None:
        return False
    try:
        return not config_class().is_encoder_decoder
    except Exception:
        return False


def load_factory(given: str, target: str) -> UserFactory:
    """Import `PATH.py` (under a private module name) or `package.module`, and check `NAME`."""
    where, _, attr = target.rpartition(":")
    module, path = _import_file(given, Path(where)) if where.endswith(".py") else _import_module(given, where)
    if not hasattr(module, attr):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise HarnessError(f"--model {given}: {where} defines no '{attr}' (it defines: {', '.join(defined) or 'none'})"
                           f"; NAME must be a callable NAME(hf_config) -> torch.nn.Module")
    factory = getattr(module, attr)
    if not callable(factory):
        raise HarnessError(f"--model {given}: '{attr}' in {where} is a {type(factory).__name__}, not a callable "
                           "NAME(hf_config) -> torch.nn.Module")
    loader = getattr(module, LOADER, None)
    if loader is not None and not callable(loader):
        raise HarnessError(f"--model {given}: {LOADER} in {where} is not a function (module, state_dict)")
    return UserFactory(given, factory, loader, str(path), file_sha256(path))


def _import_file(given: str, path: Path) -> tuple[ModuleType, Path]:
    if not path.is_file():
        raise HarnessError(f"--model {given}: no such file '{path}'; give PATH.py:NAME (e.g. {EXAMPLE}) or "
                           "package.module:NAME")
    digest = file_sha256(path)
    name = f"harness_user_{path.stem}_{digest[:12]}"  # private: never shadows a module of the same name
    if name in sys.modules:
        return sys.modules[name], path
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    sys.path.insert(0, str(path.resolve().parent))  # so the file can import its sibling files
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise HarnessError(f"--model {given}: importing {path} failed: {type(e).__name__}: {first_line(e)}") from e
    finally:
        if str(path.resolve().parent) in sys.path:
            sys.path.remove(str(path.resolve().parent))
    return module, path


def _import_module(given: str, dotted: str) -> tuple[ModuleType, Path]:
    try:
        module = importlib.import_module(dotted)
    except Exception as e:
        raise HarnessError(f"--model {given}: cannot import module '{dotted}' ({type(e).__name__}: {first_line(e)}); "
                           f"give PATH.py:NAME (e.g. {EXAMPLE}) or an importable package.module:NAME") from e
    if not getattr(module, "__file__", None):
        raise HarnessError(f"--model {given}: module '{dotted}' has no source file to hash")
    return module, Path(module.__file__)


# -- building ---------------------------------------------------------------------------------------

def build_user(info: ModelInfo, user: UserFactory, ref: ModelSpec, weights: Weights, device: str) -> UserLM:
    """Call NAME(hf_config), place the weights, probe the forward's output, wrap it."""
    module = _call_factory(user, weights.hf_config)
    meta = _reference_meta(ref, weights.hf_config)
    encoder = meta is not None and meta.get_output_embeddings() is None
    alignment = place_weights(user, module, weights.state_dict, meta)
    adapter = UserLM(info, module, weights.tokenizer, weights, device, alignment, encoder)
    adapter.model_sha256 = user.sha256
    adapter.probe()
    return adapter


def _call_factory(user: UserFactory, hf_config) -> nn.Module:
    name = getattr(user.factory, "__name__", "NAME")
    try:
        module = user.factory(hf_config)
    except Exception as e:
        raise HarnessError(f"{user.given}: {name}(hf_config) raised {type(e).__name__}: {first_line(e)}") from e
    if not isinstance(module, nn.Module):
        raise HarnessError(f"{user.given}: {name}(hf_config) returned a {type(module).__name__}, "
                           "not a torch.nn.Module")
    return module


def _reference_meta(ref: ModelSpec, hf_config) -> nn.Module | None:
    """The reference class on the meta device (no memory): its Conv1D layouts, buffers and LM head."""
    try:
        with torch.device("meta"):
            return ref.arch.hf_model_class(hf_config)
    except Exception:  # a reference that cannot be built on meta: align by shapes alone
        return None


def place_weights(user: UserFactory, module: nn.Module, state_dict: dict[str, Tensor],
                  meta: nn.Module | None) -> Alignment:
    """The file's `load_reference_weights`, or the aligner (harness.api.align)."""
    in_out = [] if meta is None else [n for n in _conv1d_weights(meta) if n in state_dict]
    buffers = [] if meta is None else [n for n, _ in meta.named_buffers()]
    encoder = meta is not None and meta.get_output_embeddings() is None
    optional = {n for n in state_dict if n in buffers or (encoder and n.startswith("pooler."))}
    reference = reference_slots(state_dict, in_out)
    aliases = tied_aliases(state_dict)
    if user.loader is not None:
        return _custom_load(user, module, state_dict, reference, aliases, optional)
    hint = f"rename them as the reference does, or define {LOADER}(module, state_dict) in {user.source}"
    alignment = align(module_slots(module), reference, aliases, optional, hint=hint)
    alignment.load(module, state_dict)
    return alignment


def _conv1d_weights(meta: nn.Module) -> list[str]:
    """The reference's weights stored (in, out): those of its `Conv1D` modules (GPT-2, GPT-1)."""
    return [f"{n}.weight" for n, m in meta.named_modules() if type(m).__name__ == "Conv1D"]


def _custom_load(user: UserFactory, module: nn.Module, state_dict: dict[str, Tensor], reference: list[Slot],
                 aliases: dict[str, str], optional: set[str]) -> Alignment:
    """Run the user's loader twice: once on a fingerprint of the checkpoint (every tensor distinct
    seeded noise, tied copies identical), to learn where each reference tensor went, which maps the
    module's gradients back to the reference and finds what the loader left out; then on the real tensors."""
    g = torch.Generator().manual_seed(0)
    fingerprint = {n: torch.randn(t.shape, generator=g, dtype=torch.float32) for n, t in state_dict.items()}
    fingerprint.update({a: fingerprint[o] for a, o in aliases.items()})
    _run_loader(user, module, fingerprint)
    placements = _infer_placements(module, fingerprint, reference)
    _check_loader_covered(user, module, placements, reference, aliases, optional)
    _run_loader(user, module, dict(state_dict))
    slots = {r.name: r for r in reference}
    names = {n: s.name for s in module_slots(module) for n in s.names if s.name in {p.target for p in placements}}
    return Alignment(placements, slots, aliases, names)


def _check_loader_covered(user: UserFactory, module: nn.Module, placements: list[Placement], reference: list[Slot],
                          aliases: dict[str, str], optional: set[str]) -> None:
    """Every parameter filled from the checkpoint and every reference tensor used, or one line naming them."""
    placed = {p.target for p in placements}
    sources = {aliases.get(s, s) for p in placements for s in p.sources}
    empty = [f"your {s.name} {s.shape}" for s in module_slots(module) if not s.buffer and s.name not in placed]
    unused = [f"reference {r.name} {r.shape}" for r in reference
              if r.name not in sources and r.name not in aliases and r.name not in optional]
    if empty or unused:
        items = empty + unused
        shown = ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")
        raise HarnessError(f"{user.given}: {LOADER}(module, state_dict) left tensors unplaced: {shown}; "
                           "copy each reference tensor into the module (transposed or split as needed)")


def _run_loader(user: UserFactory, module: nn.Module, state_dict: dict[str, Tensor]) -> None:
    try:
        with torch.no_grad():
            user.loader(module, state_dict)
    except Exception as e:
        raise HarnessError(f"{user.given}: {LOADER}(module, state_dict) raised {type(e).__name__}: "
                           f"{first_line(e)}") from e


def _infer_placements(module: nn.Module, fingerprint: dict[str, Tensor], reference: list[Slot]) -> list[Placement]:
    """Where each module tensor's value came from: a reference tensor whole, transposed, or a third of
    a fused one (found by exact value; the fingerprint makes every reference value unique)."""
    units: dict[tuple, list[tuple[Tensor, str, tuple[int, int] | None, bool]]] = {}
    for r in reference:
        canon = fingerprint[r.name].T if r.layout == "in_out" else fingerprint[r.name]
        pieces = [(canon, None)] + ([(c, (i, 3)) for i, c in enumerate(canon.chunk(3))] if canon.shape[0] % 3 == 0
                                     and canon.dim() >= 1 and canon.shape[0] > 0 else [])
        for value, part in pieces:
            for transpose, v in ((False, value), (True, value.T if value.dim() == 2 else None)):
                if v is not None and v.numel():
                    units.setdefault((tuple(v.shape), float(v.flatten()[0])), []).append((v, r.name, part, transpose))
    placements = []
    params = dict(module.named_parameters(remove_duplicate=False))
    for slot in module_slots(module):
        t = params.get(slot.name)
        if t is None or not t.numel():
            continue
        key = (tuple(t.shape), float(t.detach().flatten()[0].float()))
        hit = next((u for u in units.get(key, []) if torch.equal(u[0], t.detach().float().cpu())), None)
        if hit is not None:
            placements.append(Placement(slot.name, (hit[1],), hit[2], hit[3], "custom"))
    return placements


# -- the adapter ------------------------------------------------------------------------------------

class UserLM(ModelAdapter):
    """A user's module behind the adapter: output normalised, decoding by its own loop over forward."""

    capabilities = DECODER_CAPABILITIES

    def __init__(self, info: ModelInfo, module: nn.Module, tokenizer, weights: Weights, device: str,
                 alignment: Alignment, encoder: bool) -> None:
        super().__init__(info, module, tokenizer, weights, device)
        self.alignment = alignment
        self.encoder = encoder
        self.capabilities = ENCODER_CAPABILITIES if encoder else DECODER_CAPABILITIES
        params = inspect.signature(module.forward).parameters
        self._takes_targets = "targets" in params
        self._takes_mask = "attention_mask" in params
        self._shortcut = False  # forward(idx) returns only the last position; full logits need targets
        self.model_sha256: str | None = None

    @property
    def max_length(self) -> int:
        cfg = self.weights.hf_config
        return getattr(cfg, "n_positions", None) or cfg.max_position_embeddings

    @property
    def width(self) -> int:  # what the last output dimension must be
        cfg = self.weights.hf_config
        return cfg.hidden_size if self.encoder else cfg.vocab_size

    def probe(self) -> None:
        """Check the forward on a short seeded input before any task runs; detect the nanoGPT shortcut."""
        T = min(4, self.max_length)
        idx = torch.randint(0, self.tokenizer.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = self._output(self.module, idx.to(self.device), None, targets=False)
            if self.encoder or out.shape[1] == T:
                return
            if not self._takes_targets:
                raise HarnessError(
                    f"{self.name}: forward(input_ids) returns only the last position {tuple(out.shape)} without "
                    "targets; return logits for every position, e.g. `logits = self.lm_head(x)` instead of "
                    "`self.lm_head(x[:, [-1], :])`, or take `targets=None` as nanoGPT's forward does")
            self._shortcut = True
            full = self._output(self.module, idx.to(self.device), None, targets=True)
            if not torch.allclose(full[:, -1:], out, atol=1e-5, rtol=0):
                raise HarnessError(f"{self.name}: forward(idx) (last position only) and forward(idx, targets) "
                                   "disagree at the last position; the shortcut must compute the same logits")

    def _output(self, module: nn.Module, idx: Tensor, mask: Tensor | None, targets: bool) -> Tensor:
        kwargs = {"targets": idx} if targets else {}
        if mask is not None and self._takes_mask:
            kwargs["attention_mask"] = mask
        try:
            out = module(idx, **kwargs)
        except HarnessError:
            raise
        except Exception as e:
            raise HarnessError(f"{self.name}: forward(input_ids) raised {type(e).__name__}: {first_line(e)}") from e
        return self._normalise(out, idx)

    def _normalise(self, out, idx: Tensor) -> Tensor:
        what = "last_hidden_state" if self.encoder else "logits"
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            out = out[0]
        elif not isinstance(out, Tensor):
            out = getattr(out, what, None) if hasattr(out, what) else getattr(out, "logits", out)
        if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[0] != idx.shape[0] \
                or out.shape[-1] != self.width:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise HarnessError(f"{self.name}: forward(input_ids {tuple(idx.shape)}) must return {what} "
                               f"(B, T, {self.width}), a tuple starting with them, or an object with .{what}; "
                               f"got {got}")
        return out

    def _full(self, module: nn.Module, idx: Tensor, mask: Tensor | None = None) -> Tensor:
        return self._output(module, idx, mask, targets=self._shortcut)

    # LOGITS / SCORE / TRAIN / ENCODE
    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = None if attention_mask is None else attention_mask.to(self.device)
        out = self._full(self.module, input_ids.to(self.device), mask)
        return out @ self._word_embeddings().T if self.encoder else out

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self._full(self.module, input_ids.to(self.device), mask)

    def _word_embeddings(self) -> Tensor:
        """An encoder's logits are scored against its token embeddings, as bert-hf's are."""
        source = next(n for n, s in self.alignment.reference.items() if s.shape[0] == self.weights.hf_config.vocab_size)
        params = dict(self.module.named_parameters(remove_duplicate=False))
        target = next((p.target for p in self.alignment.placements if p.sources == (source,)), None)
        if target is None:
            raise HarnessError(f"{self.name}: no tensor of the module holds the reference's {source}")
        return params[target].T if self.alignment.source_of(target).transpose else params[target]

    def forward(self, module: nn.Module, input_ids: Tensor) -> Tensor:
        return self._full(module, input_ids)

    def reference_layout(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.alignment.to_reference(tensors)

    # GENERATE / CAUSAL_LM: the harness's own loop over forward, no cache
    @torch.no_grad()
    def decode(self, idx: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Extend idx (B, T) by max_new_tokens, re-running forward on the (cropped) sequence each step."""
        for _ in range(max_new_tokens):
            window = idx[:, -self.max_length:]
            last = self._output(self.module, window, None, targets=False)[:, -1]  # (B, V); the shortcut is fine
            idx = torch.cat([idx, sample_next(last.float(), temperature, top_k, top_p, generator)], dim=1)
        return idx

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=0):
        generator = torch.Generator(device=self.device).manual_seed(seed)
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        return self.decode(idx, max_new_tokens, temperature, top_k, top_p, generator)[0, len(prompt_ids):].tolist()

    def generate_batch(self, idx: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy, by the same loop (no KV cache: a user's module need not have one)."""
        return self.decode(idx.to(self.device), max_new_tokens)

    @torch.inference_mode()
    def sample_batch(self, idx: Tensor, max_new_tokens: int, temperature: float, seed: int,
                     allowed: list[int] | None = None, module: nn.Module | None = None) -> Tensor:
        """Seeded sampling by the same loop, on `module` (default: this adapter's), over `allowed` ids only."""
        module = self.module if module is None else module
        generator = torch.Generator(device=self.device).manual_seed(seed)
        idx = idx.to(self.device)
        keep = None if allowed is None else torch.tensor(allowed, device=self.device)
        for _ in range(max_new_tokens):
            last = self._output(module, idx[:, -self.max_length:], None, targets=False)[:, -1].float()  # (B, V)
            if keep is not None:
                last = torch.full_like(last, float("-inf")).index_copy_(-1, keep, last[:, keep])
            idx = torch.cat([idx, sample_next(last, temperature, None, None, generator)], dim=1)
        return idx


MODELS.add_resolver(resolve_user_model)
