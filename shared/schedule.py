"""Learning-rate schedules across the whole federated run.

A site trains a few dozen steps per round, so a schedule that restarted every
round would never anneal. The schedule runs over the run's global step
``(round - 1) * local_steps + step`` and the total ``num_rounds * local_steps``,
both known from the round config, so every site follows the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from shared.registry import Registry

Schedule = Callable[[float, int, int], float]


def _constant(base: float, step: int, total: int) -> float:
    return base


def _cosine(base: float, step: int, total: int) -> float:
    # Annealed to zero at the last step: the final global model is the low-noise one.
    progress = min(1.0, step / max(1, total))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def _poly(base: float, step: int, total: int) -> float:
    # nnU-Net's schedule: (1 - t)^0.9.
    progress = min(1.0, step / max(1, total))
    return base * (1.0 - progress) ** 0.9


SCHEDULES: Registry[Schedule] = Registry("lr-schedule", {
    "constant": _constant,
    "cosine": _cosine,
    "poly": _poly,
})


def learning_rate(schedule: str, base: float, server_round: int, step: int,
                  local_steps: int, num_rounds: int) -> float:
    """Return the learning rate of local ``step`` (from 0) in ``server_round`` (from 1).

    Parameters
    ----------
    schedule : str
        ``constant``, ``cosine`` or ``poly``.
    base : float
        Peak learning rate.
    server_round : int
        The round, from 1.
    step : int
        The local step within the round, from 0.
    local_steps : int
        Steps per round.
    num_rounds : int
        Rounds in the run.

    Returns
    -------
    float
        The learning rate for that step.
    """
    global_step = max(0, server_round - 1) * local_steps + step
    return SCHEDULES[schedule](base, global_step, num_rounds * local_steps)
