"""Learning-rate schedules over the run's global step, exact values."""

from __future__ import annotations

import pytest

from shared.schedule import learning_rate


def test_cosine_runs_over_all_rounds_not_each_round() -> None:
    # 2 rounds x 4 steps: global steps 0..7 of 8.
    values = [learning_rate("cosine", 1.0, r, s, 4, 2) for r in (1, 2) for s in range(4)]
    assert values[0] == 1.0
    assert values[4] == pytest.approx(0.5)                # half-way: cos(pi/2)
    assert values[2] == pytest.approx(0.5 * (1 + 2 ** -0.5))
    assert values == sorted(values, reverse=True)         # never restarts at round 2


def test_constant_and_poly() -> None:
    assert learning_rate("constant", 3e-3, 5, 7, 10, 10) == 3e-3
    assert learning_rate("poly", 1.0, 2, 0, 10, 2) == pytest.approx(0.5 ** 0.9)
    assert learning_rate("poly", 1.0, 3, 0, 10, 2) == 0.0  # past the end stays at zero
