"""`harness diagnose`: where a model first diverges from its reference, and the likely causes.

    harness diagnose --model gpt2-scratch                                  # against its reference, gpt2-hf
    harness diagnose --model examples/nanogpt_gpt2.py:build_buggy --reference gpt2-hf --weights random:tiny \\
        --json /tmp/diag.json                                              # and a plot at /tmp/diag.png

Both models get identical weights and one seeded batch; hooks at every aligned boundary (embed, each
block's attn / mlp / block output, final_norm, logits) and one backward give a table of max abs and
relative differences per site, the first site past the fp32 tolerance marked, and suspects ranked from
a catalogue of signatures confirmed by probes (docs/diagnose.md; the core is harness/api/diagnosis/).
Exit 0 when nothing diverges, 1 when something does, 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from harness.api import Capability, HarnessError, ModelAdapter, ModelSpec
from harness.api.diagnosis import Diagnosis, diagnose, plot

console = Console(width=None if sys.stdout.isatty() else 200)

EPILOG = """tolerance (every site): max |ours - reference| > 1e-5 x max(1, max |reference|) diverges.
exit codes: 0 nothing diverges; 1 a site (or a gradient) diverges; 2 bad input.
--json writes {"diverged", "first": {"site", "block", "max_abs_diff", "rel_diff"} | null,
               "sites": [{"site", "block", "module", "max_abs_diff", "rel_diff"}, ...], "suspects": [...]}
"""


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="localise where a model diverges from its reference, and why",
                       description="Hook both models at every aligned site on identical weights; print the "
                                   "difference per site, the first divergence and ranked suspects.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a registered model (gpt2-scratch, llama-scratch, ...) or your own PATH.py:NAME / "
                        "package.module:NAME (with --reference)")
    p.add_argument("--reference", default=None, metavar="REF",
                   help="the registered reference (gpt2-hf, llama-hf, bert-hf, ...); default: the model's own")
    p.add_argument("--weights", default=None,
                   help="random[:SIZE] | alias | HF-format dir; default: the architecture's default")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the result as JSON")
    p.add_argument("--plot", default=None, metavar="PATH.png",
                   help="draw the difference per site (log scale); default: beside --json (same name, .png), "
                        "none without --json")
    p.add_argument("--seq-len", type=int, default=16, metavar="T", help="tokens per sequence (default 16, >= 2)")
    p.add_argument("--seed", type=int, default=0, help="fixes the batch and random weights (default 0)")
    p.set_defaults(func=cmd_diagnose)


def _resolve(name: str, reference: str | None) -> ModelSpec:
    from harness.api import MODELS

    resolve = getattr(MODELS, "resolve", None)
    if resolve is not None:
        return resolve(name, reference)
    return MODELS.get(name)


def _check_output(path: str | None, flag: str, suffix: str | None = None) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise HarnessError(f"{flag} {path}: is a directory; give a file path, "
                           f"e.g. {flag} /tmp/diagnose{suffix or '.json'}")
    if not p.parent.exists():
        raise HarnessError(f"{flag} {path}: the directory {p.parent} does not exist; create it or choose another path")
    if suffix and p.suffix.lower() != suffix:
        raise HarnessError(f"{flag} {path}: must end in {suffix}")


def validate(args: argparse.Namespace) -> tuple[ModelSpec, ModelSpec]:
    """Every check that needs no weights: flags, paths, names, and that the pair shares an architecture."""
    from harness.api import MODELS

    if args.seq_len < 2:
        raise HarnessError(f"--seq-len {args.seq_len}: must be at least 2 (the probes compare T = 1 with T > 1)")
    if args.seed < 0:
        raise HarnessError(f"--seed {args.seed}: must be >= 0")
    _check_output(args.json_path, "--json")
    _check_output(args.plot, "--plot", ".png")
    spec = _resolve(args.model, args.reference)
    ref_name = args.reference or spec.info.reference
    if ref_name is None:
        raise HarnessError(f"--model {args.model} has no registered reference; give --reference REF "
                           "(e.g. gpt2-hf, llama-hf, bert-hf)")
    ref = MODELS.get(ref_name)
    if ref.info.arch != spec.info.arch:
        raise HarnessError(f"--reference {ref_name} is a {ref.info.arch} model but {args.model} is {spec.info.arch}; "
                           f"choose the {spec.info.arch} reference")
    return spec, ref


def _ours_call(adapter: ModelAdapter, bidirectional: bool):
    """Our logits through the adapter when it knows the module's forward (a user's file: tuple outputs,
    nanoGPT's last-position shortcut); the registered reproductions are called directly."""
    if bidirectional or adapter.info.impl == "scratch" or not adapter.can(Capability.TRAIN):
        return None
    return lambda module, batch: adapter.forward(module, batch.input_ids)


def run_diagnosis(args: argparse.Namespace) -> tuple[Diagnosis, ModelAdapter, ModelAdapter]:
    from harness.api import load_weights

    spec, ref_spec = validate(args)
    weights = load_weights(ref_spec.arch, args.weights, args.seed)
    torch.manual_seed(args.seed)
    ours, reference = spec.build(weights, "cpu"), ref_spec.build(weights, "cpu")
    limit = min(ours.max_length, reference.max_length)
    if args.seq_len > limit:
        raise HarnessError(f"--seq-len {args.seq_len}: the models see at most {limit} tokens")
    bidirectional = ref_spec.info.arch == "bert"
    try:
        result = diagnose(ours.module.float(), reference.module.float(), spec.info.arch,
                          weights.hf_config.vocab_size, args.seq_len, args.seed, bidirectional,
                          call_ours=_ours_call(ours, bidirectional))
    except (ValueError, TypeError) as e:
        raise HarnessError(f"diagnose {args.model}: {e}") from e
    return result, ours, reference


def table(result: Diagnosis, title: str) -> Table:
    t = Table(title=title)
    for col in ("site", "block", "module", "max |diff|", "rel diff", "tolerance", "grad max |diff|", ""):
        t.add_column(col, justify="right" if col in ("block", "max |diff|", "rel diff", "tolerance",
                                                     "grad max |diff|") else "left")
    for s in result.sites:
        first = s is result.first
        mark = "[bold red]<- first divergence[/bold red]" if first else ("[red]diverged[/red]" if s.diverged else
                                                                         ("[red]grad diverged[/red]" if s.grad_diverged
                                                                          else "[green]ok[/green]"))
        t.add_row(s.site, "" if s.block is None else str(s.block), s.module, _num(s.max_abs_diff), _num(s.rel_diff),
                  _num(s.tolerance), "-" if s.grad_max_abs_diff is None else _num(s.grad_max_abs_diff), mark,
                  style="bold" if first else None)
    return t


def _num(x: float) -> str:
    return "inf" if not math.isfinite(x) else ("0" if x == 0 else f"{x:.2e}")


def cmd_diagnose(args: argparse.Namespace) -> int:
    result, ours, reference = run_diagnosis(args)
    title = f"{ours.name} vs {reference.name} on {ours.weights.identity} (T={args.seq_len}, seed {args.seed})"
    console.print(table(result, title))
    if result.first is None:
        console.print("[green]no site diverges: at parity on every aligned boundary and gradient[/green]")
    else:
        f = result.first
        where = f.site if f.block is None else f"{f.site} of block {f.block}"
        console.print(f"[red]first divergence: {where} ({f.module}), max |diff| {_num(f.max_abs_diff)}, "
                      f"relative {_num(f.rel_diff)}[/red]", highlight=False)
        console.print("suspects, most likely first:")
        for i, s in enumerate(result.suspects[:5], 1):
            console.print(f"  {i}. {s.text}", highlight=False, markup=False)
    if args.json_path:
        console.print(f"json -> {result.write_json(args.json_path)}")
    plot_path = args.plot or (str(Path(args.json_path).with_suffix(".png")) if args.json_path else None)
    if plot_path:
        console.print(f"plot -> {plot(result, plot_path, title)}")
    return 1 if result.diverged else 0
