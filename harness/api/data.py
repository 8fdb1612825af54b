"""The vendored data every layer may read (tasks/data/, provenance in its README), and the WikiText
helpers shared by the `ppl` task and `harness train`'s `wikitext2` corpus.
"""

from __future__ import annotations

import re
from pathlib import Path

from harness.api.errors import HarnessError

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "tasks" / "data"
WIKITEXT_DIR = DATA_DIR / "wikitext-2-raw"
TINY_SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"
HEADING = re.compile(r" = [^=].* = ")


def load_wikitext_documents(split: str = "test") -> list[str]:
    """The raw file cut into articles: each is the exact text from one top-level heading to the next."""
    path = WIKITEXT_DIR / f"wiki.{split}.raw"
    lines = read_text(path).split("\n")
    starts = [i for i, line in enumerate(lines) if HEADING.fullmatch(line)]
    if not starts:
        raise HarnessError(f"{path}: no top-level headings (' = Title = ') found; is this WikiText raw?")
    bounds = [*starts, len(lines)]
    return ["\n".join(lines[a:b]) for a, b in zip(bounds, bounds[1:])]


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise HarnessError(f"data file '{path}' not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise HarnessError(f"cannot read '{path}' as UTF-8 text: {e}") from e


# (pattern, replacement, is_regex) in the order lm-eval applies them.
_DETOKENIZE_RULES: list[tuple[str, str, bool]] = [
    ("s '", "s'", False),
    (r"/' [0-9]/", r"/'[0-9]/", True),
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    *[(f" {p} ", f"{p} ", False) for p in (":", ";", ".", "!", "?", ",")],
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
]


def detokenize(text: str) -> str:
    """Undo WikiText's tokenization (` @-@ `, spaced punctuation, ...), as lm-eval's wikitext task does."""
    for pattern, repl, is_regex in _DETOKENIZE_RULES:
        text = re.sub(pattern, repl, text) if is_regex else text.replace(pattern, repl)
    return text
