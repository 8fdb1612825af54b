"""How the report and the terminal print a metric's value, a signed difference and a tolerance.

The kind of a number (count, flag, diff, perplexity, rate, timing, loss) is `harness.api.kinds.metric_kind`.
"""

from __future__ import annotations

import math


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_value(value, kind: str = "loss", metric: str = "") -> str:
    """A number as its kind reads best: counts as integers, rates with 4 decimals, perplexities with 6
    significant digits, differences in scientific notation, timings with 3-4 significant digits."""
    if _missing(value):
        return "-"
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if kind == "count" and value == int(value):
        return f"{int(value):,}"
    if kind == "flag":
        return "yes" if value == 1 else ("no" if value == 0 else f"{value:.4f}")
    if kind == "diff":
        return "0" if value == 0 else f"{value:.2e}"
    if kind == "perplexity":
        return f"{value:.6g}"
    if kind == "rate":
        return f"{value:.4f}"
    if kind == "timing":
        if "mfu" in metric:
            return f"{100 * value:.1f}%"
        if value == 0 or abs(value) >= 1e6 or abs(value) < 1e-3:
            return "0" if value == 0 else f"{value:.2e}"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if value == 0:
        return "0"
    return f"{value:.4f}" if 1e-3 <= abs(value) < 1e6 else f"{value:.3e}"


def fmt_delta(delta: float) -> str:
    """A signed difference: scientific below 1e-3 (and above 1e6), 3 significant digits otherwise."""
    if delta == 0:
        return "0"
    return f"{delta:+.2e}" if abs(delta) < 1e-3 or abs(delta) >= 1e6 else f"{delta:+.3g}"


def fmt_tol(value: float) -> str:
    if math.isinf(value):
        return "inf"
    return "0" if value == 0 else (f"{value:.1e}" if abs(value) < 1e-3 else f"{value:.3g}")


def _with_stderr(value, stderr, kind: str, metric: str) -> str:
    text = fmt_value(value, kind, metric)
    return text if _missing(stderr) or _missing(value) else f"{text} ± {float(stderr):.2g}"
