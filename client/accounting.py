"""Privacy accounting with Opacus: epsilon spent, noise calibration, sampling rate.

Epsilon is computed with Opacus's accountants from the full history of
``(noise_multiplier, sample_rate, steps)`` triples, so it is cumulative over
every round the site ever trained. Only sites import this module; Opacus itself
is imported on first use, so a site that never trains with DP never loads it (it
was about a fifth of the ClientApp's import time, paid again by every worker
process of a simulation).
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.privacy import Mechanism, Step


def compute_epsilon(history: Sequence[Step], delta: float, mechanism: Mechanism) -> float:
    """Return the epsilon spent by all ``history`` steps (0 for an empty history)."""
    steps = [(float(n), float(q), int(k)) for n, q, k in history if k > 0]
    if not steps:
        return 0.0
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism)
    accountant.history = steps
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    mechanism: Mechanism) -> float:
    """Return the noise multiplier that spends ``target_epsilon`` in ``steps`` steps."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=mechanism))


def sample_rate(expected_batch: int, num_units: int) -> float:
    """Return Poisson sampling's rate over ``num_units`` units (patients).

    Each unit is in a batch with this probability, independently, so a batch holds
    ``expected_batch`` units on average (every unit, at most).
    """
    if num_units < 1:
        raise ValueError("Poisson sampling needs at least one unit")
    return min(1.0, expected_batch / num_units)
