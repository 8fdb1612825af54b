"""How much two numbers may differ before the harness calls it a difference: one rule, used by the
report's pair tables (scratch vs reference) and by the gate (current vs baseline).

    allowed = max(tolerance, noise)
    noise   = 1.96 * sqrt(se_a**2 + se_b**2)

`tolerance` is the metric's own (`MetricSpec.pair_atol + pair_rtol * |reference|` for a pair;
`max(gate_atol, gate_rtol * |baseline|)`, or a `--tol` override, for the gate). `noise` counts
the stderr of every row that carries one; a row without a stderr (a deterministic metric) adds
nothing, so two deterministic rows get no slack beyond the tolerance, and a fine-tuning score with
a bootstrap stderr gets the 95% band of the difference of two independent estimates.
"""

from __future__ import annotations

import math


def _present(se) -> bool:
    return se is not None and not (isinstance(se, float) and math.isnan(se))


def noise_slack(*stderrs) -> float:
    """1.96 x sqrt(sum of the squared stderrs present); 0 when no row carries one."""
    ses = [float(s) for s in stderrs if _present(s)]
    return 1.96 * math.sqrt(sum(s * s for s in ses)) if ses else 0.0


def allowed_difference(tolerance: float, *stderrs) -> float:
    return max(tolerance, noise_slack(*stderrs))
