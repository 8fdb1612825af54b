"""The weight aligner: place a reference checkpoint's tensors into a user's own module.

A user's GPT-2 (docs/bring-your-own.md) rarely names or lays out its tensors exactly as the
transformers checkpoint does. The aligner finds, for every tensor of the module, where its value
comes from, by these rules, in this order:

1. by name, after stripping wrapper prefixes (`transformer.`, `model.`, `_orig_mod.`, `module.`, ...)
   from both sides, in the module's own layout: a reference weight stored (in, out) (GPT-2's `Conv1D`)
   is transposed into an `nn.Linear` (out, in), decided by the owning module's type, not by the shape,
   so square projections are transposed too;
2. fused or separate q/k/v: a fused reference projection (`c_attn`, `qkv`, ...) is split into the
   module's separate query/key/value projections under the same parent (`W_query`, `q_proj`, ...), and
   separate reference projections are concatenated into a fused one;
3. tied tensors: a reference tensor that is a copy of another (GPT-2's `lm_head.weight` is `wte`) may
   fill a module's tied or untied head; a module that ties two tensors the reference keeps apart is refused;
4. what is left, by order and shape: the module's remaining tensors, in registration order, against the
   reference's remaining ones (a fused q/k/v counted as three when the module has no fused tensor), only
   when every shape agrees along the whole sequence;
5. buffers of the module the reference does not have (a causal-mask buffer) are ignored; reference
   tensors the caller marks optional (its own buffers, BERT's pooler) may stay unused.

Anything else is one line (`AlignmentError`) naming each unplaced tensor, its shape and the closest
candidates. The result (`Alignment`) loads the tensors (`load`) and maps the module's tensors (weights or
gradients) back to the reference's names and layouts (`to_reference`), which parity and diagnose use.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.api.errors import HarnessError

WRAPPER_PREFIXES = ("_orig_mod.", "module.", "model.", "transformer.", "base_model.", "backbone.", "bert.")
FUSED_QKV = ("c_attn", "qkv", "wqkv", "qkv_proj", "in_proj", "query_key_value", "to_qkv", "attn_qkv")
QKV_ROLES = {  # module names of a separate query / key / value projection
    "q": ("q", "query", "w_query", "q_proj", "wq", "to_q", "q_lin", "queries"),
    "k": ("k", "key", "w_key", "k_proj", "wk", "to_k", "k_lin", "keys"),
    "v": ("v", "value", "w_value", "v_proj", "wv", "to_v", "v_lin", "values"),
}
IN_OUT, OUT_IN, UNKNOWN = "in_out", "out_in", "unknown"  # how a 2-D weight is stored


class AlignmentError(HarnessError):
    """Reference tensors that cannot be placed into the module (one line: each tensor and its candidates)."""


@dataclass(frozen=True)
class Slot:
    """One tensor as the aligner sees it: a name, a shape and how a matrix is stored."""

    name: str
    shape: tuple[int, ...]
    layout: str = OUT_IN  # IN_OUT (Conv1D), OUT_IN (nn.Linear, embeddings, vectors) or UNKNOWN
    buffer: bool = False
    names: tuple[str, ...] = ()  # every name of a tied tensor (the first is `name`)

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        """The shape in the (out, in) layout."""
        return self.shape[::-1] if self.layout == IN_OUT and len(self.shape) == 2 else self.shape


@dataclass(frozen=True)
class Placement:
    """Module tensor `target` gets the reference tensors `sources` (concatenated along the output dim),
    or chunk `part = (i, n)` of the single source, transposed from the (out, in) layout if `transpose`."""

    target: str
    sources: tuple[str, ...]
    part: tuple[int, int] | None = None
    transpose: bool = False
    rule: str = "name"  # name | split | fuse | order | custom


@dataclass
class Alignment:
    placements: list[Placement]
    reference: dict[str, Slot]  # name -> reference slot (shapes and layouts)
    aliases: dict[str, str] = field(default_factory=dict)  # reference tensor -> the one it is a copy of
    names: dict[str, str] = field(default_factory=dict)  # any module name of a tensor -> its placement target
    ignored: tuple[str, ...] = ()  # module buffers the reference has no tensor for

    def values(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Module name -> the value placed there, in the module's layout."""
        return {p.target: _value(p, state_dict, self.reference) for p in self.placements}

    def load(self, module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
        tensors = _module_tensors(module)
        with torch.no_grad():
            for name, value in self.values(state_dict).items():
                tensors[name].copy_(value)

    def source_of(self, name: str) -> Placement | None:
        """Where a module tensor (any of its tied names) got its value from."""
        target = self.names.get(name)
        return next((p for p in self.placements if p.target == target), None)

    def to_reference(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Module-named tensors (weights or gradients) -> reference names and layouts. A reference tensor
        filled into two separate module tensors (an untied head loaded from a tied checkpoint) gets
        their sum, which is the gradient the tied reference sees; a tied alias folds into its tensor."""
        sums: dict[str, torch.Tensor] = {}
        chunks: dict[str, dict[int, torch.Tensor]] = {}
        for name, t in tensors.items():
            p = self.source_of(name)
            if p is None:
                continue
            c = t.T if p.transpose else t
            if p.part is not None:
                chunks.setdefault(p.sources[0], {})[p.part[0]] = c
                if len(chunks[p.sources[0]]) == p.part[1]:
                    parts = chunks.pop(p.sources[0])
                    _add(sums, p.sources[0], torch.cat([parts[i] for i in range(p.part[1])], dim=0))
                continue
            sizes = [self.reference[s].canonical_shape[0] for s in p.sources]
            for source, piece in zip(p.sources, c.split(sizes, dim=0) if len(sizes) > 1 else (c,)):
                _add(sums, self.aliases.get(source, source), piece)
        return {n: (t.T if self.reference[n].layout == IN_OUT else t).contiguous() for n, t in sums.items()}


def _add(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    sums[name] = sums[name] + value if name in sums else value


def _value(p: Placement, state_dict: dict[str, torch.Tensor], reference: dict[str, Slot]) -> torch.Tensor:
    canon = [state_dict[s].T if reference[s].layout == IN_OUT else state_dict[s] for s in p.sources]
    value = torch.cat(canon, dim=0) if len(canon) > 1 else canon[0]
    if p.part is not None:
        value = value.chunk(p.part[1], dim=0)[p.part[0]]
    return (value.T if p.transpose else value).detach().clone().contiguous()


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters(remove_duplicate=False))
    return {**params, **dict(module.named_buffers(remove_duplicate=False))}


# -- describing a module and a reference -------------------------------------------------------------

def module_slots(module: nn.Module) -> list[Slot]:
    """The module's parameters and buffers in registration order, tied names grouped, layouts read off
    the owning module (nn.Linear / nn.Embedding: (out, in); a class named Conv1D: (in, out))."""
    owners = dict(module.named_modules(remove_duplicate=False))
    groups: dict[int, list[str]] = {}
    kinds: dict[int, tuple[torch.Tensor, bool]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(name)
        kinds.setdefault(id(t), (t, not isinstance(t, nn.Parameter)))
    slots = []
    for key, names in groups.items():
        t, is_buffer = kinds[key]
        owner = owners.get(names[0].rpartition(".")[0])
        slots.append(Slot(names[0], tuple(t.shape), _layout(owner, names[0], t), is_buffer, tuple(names)))
    return slots


def _layout(owner: nn.Module | None, name: str, t: torch.Tensor) -> str:
    if t.dim() != 2:
        return OUT_IN
    if type(owner).__name__ == "Conv1D" and name.endswith("weight"):
        return IN_OUT
    if isinstance(owner, (nn.Linear, nn.Embedding)):
        return OUT_IN
    return UNKNOWN


def reference_slots(state_dict: dict[str, torch.Tensor], in_out: Iterable[str] = ()) -> list[Slot]:
    """The reference's tensors in checkpoint order; `in_out` names the ones stored (in, out)."""
    in_out = set(in_out)
    return [Slot(n, tuple(t.shape), IN_OUT if n in in_out and t.dim() == 2 else OUT_IN)
            for n, t in state_dict.items()]


def tied_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Reference tensors that are exact copies of an earlier one (a tied head: `lm_head.weight` is `wte`),
    as {copy: original}. Constant tensors (LayerNorm ones, zero biases) are never taken for ties."""
    aliases: dict[str, str] = {}
    seen: list[tuple[str, torch.Tensor]] = []
    for name, t in state_dict.items():
        if t.numel() > 1 and t.is_floating_point() and bool((t.flatten()[1:] != t.flatten()[0]).any()):
            match = next((n for n, s in seen if s.shape == t.shape and s.dtype == t.dtype and torch.equal(s, t)), None)
            if match is not None:
                aliases[name] = match
                continue
            seen.append((name, t))
    return aliases


def strip_wrappers(name: str) -> str:
    """`_orig_mod.transformer.h.0.attn.c_attn.weight` -> `h.0.attn.c_attn.weight`."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


# -- matching -----------------------------------------------------------------------------------------

def _fit(target: Slot, canonical: tuple[int, ...]) -> bool | None:
    """Whether `target` takes a value of (out, in) shape `canonical` transposed (True), as is (False),
    or not at all (None)."""
    if target.layout == IN_OUT:
        return True if target.shape == canonical[::-1] else None
    if target.shape == canonical:
        return False
    if target.layout == UNKNOWN and target.shape == canonical[::-1]:
        return True
    return None


def _split_name(name: str) -> tuple[str, str, str]:
    """`h.0.attn.c_attn.weight` -> (`h.0.attn`, `c_attn`, `weight`)."""
    path, _, leaf = name.rpartition(".")
    parent, _, module = path.rpartition(".")
    return parent, module.lower(), leaf


def _role(module: str) -> str | None:
    return next((r for r, names in QKV_ROLES.items() if module in names), None)


class _Matcher:
    def __init__(self, targets: list[Slot], reference: list[Slot], aliases: dict[str, str], optional: set[str]):
        self.targets = list(targets)
        self.reference = {r.name: r for r in reference}
        self.order = [r.name for r in reference]
        self.aliases = aliases
        self.optional = optional
        self.placed: dict[str, Placement] = {}
        self.used: set[str] = set()
        self.problems: list[str] = []

    def place(self, target: Slot, sources: tuple[str, ...], transpose: bool, rule: str, part=None) -> None:
        self.placed[target.name] = Placement(target.name, sources, part, transpose, rule)
        self.used.update(sources)
        self.used.update(self.aliases.get(s, s) for s in sources)
        self.used.update(a for a, o in self.aliases.items() if o in sources)

    def open_targets(self, buffers: bool = True) -> list[Slot]:
        return [t for t in self.targets if t.name not in self.placed and (buffers or not t.buffer)]

    def open_reference(self) -> list[str]:
        return [n for n in self.order if n not in self.used]

    def by_name(self) -> None:
        index = {strip_wrappers(n): n for n in self.order}
        for t in self.targets:
            hits = [index[k] for k in dict.fromkeys(strip_wrappers(n) for n in t.names or (t.name,)) if k in index]
            hits = [h for h in hits if _fit(t, self.reference[h].canonical_shape) is not None]
            originals = {self.aliases.get(h, h) for h in hits}
            if len(originals) > 1:
                self.problems.append(f"your {' and '.join(t.names)} are one tied tensor but the reference keeps "
                                     f"{' and '.join(sorted(originals))} apart; untie them")
            elif hits:
                self.place(t, (hits[0],), bool(_fit(t, self.reference[hits[0]].canonical_shape)), "name")

    def split_fused(self) -> None:
        """A fused reference q/k/v into the module's separate projections under the same parent."""
        targets = {strip_wrappers(n).lower(): t for t in self.open_targets() for n in (t.names or (t.name,))}
        for name in self.open_reference():
            parent, module, leaf = _split_name(strip_wrappers(name))
            if module not in FUSED_QKV:
                continue
            found = [next((targets[k] for m in QKV_ROLES[r] if (k := f"{parent}.{m}.{leaf}".lower()) in targets),
                          None) for r in "qkv"]
            shape = self.reference[name].canonical_shape
            if None in found or shape[0] % 3:
                continue
            part_shape = (shape[0] // 3, *shape[1:])
            fits = [_fit(t, part_shape) for t in found]
            if None not in fits:
                for i, (t, transpose) in enumerate(zip(found, fits)):
                    self.place(t, (name,), bool(transpose), "split", part=(i, 3))

    def fuse_separate(self) -> None:
        """Separate reference q/k/v into a fused module projection under the same parent."""
        groups: dict[tuple[str, str], dict[str, str]] = {}
        for name in self.open_reference():
            parent, module, leaf = _split_name(strip_wrappers(name))
            if _role(module):
                groups.setdefault((parent, leaf), {})[_role(module)] = name
        targets = {strip_wrappers(n).lower(): t for t in self.open_targets() for n in (t.names or (t.name,))}
        for (parent, leaf), roles in groups.items():
            target = next((targets[k] for f in FUSED_QKV if (k := f"{parent}.{f}.{leaf}".lower()) in targets), None)
            if target is None or len(roles) != 3:
                continue
            sources = tuple(roles[r] for r in "qkv")
            shapes = [self.reference[s].canonical_shape for s in sources]
            fused = (sum(s[0] for s in shapes), *shapes[0][1:])
            transpose = _fit(target, fused)
            if transpose is not None and len({s[1:] for s in shapes}) == 1:
                self.place(target, sources, transpose, "fuse")

    def by_order(self) -> None:
        """The rest by registration order and shape, when the whole sequence agrees."""
        targets = self.open_targets(buffers=False)
        if not targets:
            return
        left = self.open_reference()
        for with_aliases in (False, True):
            units = self._units([n for n in left if with_aliases or n not in self.aliases], targets)
            if len(units) == len(targets):
                fits = [_fit(t, shape) for t, (_, _, shape) in zip(targets, units)]
                if None not in fits:
                    for t, (name, part, _), transpose in zip(targets, units, fits):
                        self.place(t, (name,), bool(transpose), "order", part=part)
                    return

    def _units(self, names: list[str], targets: list[Slot]) -> list[tuple[str, tuple[int, int] | None, tuple]]:
        """The reference tensors as the module would register them: a fused q/k/v the module has no
        fused tensor for becomes three, and a fused weight followed by its bias becomes three
        (weight, bias) pairs, the order of three nn.Linear."""
        units: list[tuple[str, tuple[int, int] | None, tuple]] = []
        for name in names:
            shape = self.reference[name].canonical_shape
            fused = _split_name(strip_wrappers(name))[1] in FUSED_QKV and shape[0] % 3 == 0
            if not fused or any(_fit(t, shape) is not None for t in targets):
                units.append((name, None, shape))
                continue
            thirds = [(name, (i, 3), (shape[0] // 3, *shape[1:])) for i in range(3)]
            weight = name.removesuffix(".bias") + ".weight"
            if name.endswith(".bias") and units[-3:] and all(u[0] == weight and u[1] for u in units[-3:]):
                units[-3:] = [u for pair in zip(units[-3:], thirds) for u in pair]
            else:
                units += thirds
        return units


def align(targets: list[Slot], reference: list[Slot], aliases: dict[str, str] | None = None,
          optional: Iterable[str] = (), hint: str = "") -> Alignment:
    """Place every reference tensor (except `optional` ones and tied copies) into exactly one place of the
    module's `targets` (every parameter must get a value), or raise `AlignmentError`. `hint` ends the
    error line (e.g. how to write `load_reference_weights`)."""
    aliases = dict(aliases or {})
    m = _Matcher(targets, reference, aliases, set(optional))
    m.by_name()
    m.split_fused()
    m.fuse_separate()
    m.by_order()
    missing = [t for t in m.open_targets(buffers=False)]
    unused = [n for n in m.open_reference() if n not in aliases and n not in m.optional]
    if m.problems or missing or unused:
        raise AlignmentError(_unplaced_message(m, missing, unused, hint))
    names = {n: t.name for t in targets if t.name in m.placed for n in (t.names or (t.name,))}
    ignored = tuple(t.name for t in m.open_targets() if t.buffer)
    return Alignment(list(m.placed.values()), m.reference, aliases, names, ignored)


def _unplaced_message(m: _Matcher, missing: list[Slot], unused: list[str], hint: str) -> str:
    items = list(m.problems)
    for name in unused:
        r = m.reference[name]
        items.append(f"reference {name} {r.shape} has no place (closest: {_closest_targets(m, r)})")
    for t in missing:
        items.append(f"your {t.name} {t.shape} gets no value (closest: {_closest_reference(m, t)})")
    shown = items[:6] + ([f"... and {len(items) - 6} more"] if len(items) > 6 else [])
    return f"cannot place the reference's tensors into your module: {'; '.join(shown)}" + (f"; {hint}" if hint else "")


def _similar(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, strip_wrappers(a), strip_wrappers(b)).ratio()


def _closest_targets(m: _Matcher, r: Slot) -> str:
    scored = sorted(m.targets, key=lambda t: -(_similar(r.name, t.name) + (_fit(t, r.canonical_shape) is not None)))
    return ", ".join(f"{t.name} {t.shape}" for t in scored[:2]) or "none"


def _closest_reference(m: _Matcher, t: Slot) -> str:
    scored = sorted(m.reference.values(), key=lambda r: -(_similar(r.name, t.name) + (_fit(t, r.canonical_shape)
                                                                                        is not None)))
    return ", ".join(f"{r.name} {r.shape}" for r in scored[:2]) or "none"
