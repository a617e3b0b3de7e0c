"""Update validation and the server-step guard, exact values on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from server.validation import norm_outliers, step_problem, update_norm, update_problem


def _ref() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}


def test_update_layout_is_checked_exactly() -> None:
    assert update_problem(_ref(), _ref()) is None
    assert update_problem(_ref(), {"w": _ref()["w"]}) == (
        "parameter names differ from the global model: misses b")
    assert update_problem(_ref(), {**_ref(), "x": np.zeros(1)}) == (
        "parameter names differ from the global model: has unknown x")
    assert update_problem(_ref(), {**_ref(), "b": np.zeros(3, np.float32)}) == (
        "parameter 'b' has shape (3,), expected (2,)")
    assert update_problem(_ref(), {**_ref(), "b": np.zeros(2, np.float64)}) == (
        "parameter 'b' has dtype float64, expected float32 (transfer-dtype float32)")
    nan = np.array([0.0, np.nan], np.float32)
    assert update_problem(_ref(), {**_ref(), "b": nan}) == (
        "parameter 'b' holds NaN or infinite values")


def test_update_norm_and_outliers() -> None:
    update = {"w": np.full((2, 2), 1.0, np.float32), "b": np.zeros(2, np.float32)}
    assert update_norm(_ref(), update) == pytest.approx(2.0)
    norms = {"a": 1.0, "b": 2.0, "c": 1000.0}
    assert norm_outliers(norms, ratio=10) == {
        "c": "update norm 1000 is 500.0 times the typical site's 2 (limit update-norm-ratio 10)"}
    assert norm_outliers({"a": 1.0, "b": 1000.0}, ratio=10).keys() == {"b"}
    assert norm_outliers({"a": 3.0}, ratio=10) == {}
    assert norm_outliers({"a": 3.0, "b": 2.0}, ratio=10, absolute=2.5) == {
        "a": "update norm 3 is above max-update-norm 2.5"}


def test_server_step_guard() -> None:
    old = {"w": np.ones(4, np.float32)}
    assert step_problem(old, {"w": np.full(4, 5.0, np.float32)}, max_growth=10) is None
    assert "grow 1e+29 times" in str(step_problem(old, {"w": np.full(4, 1e29, np.float32)}, 10))
    assert "not finite" in str(step_problem(old, {"w": np.array([1, np.inf, 1, 1],
                                                                 np.float32)}, 10))


def _round(responders: dict[int, object], **kw: object) -> tuple[object, object]:
    from server.federation import FederationState, run_round
    from server.history import MetricsHistory
    from server.strategies import build_strategy
    from tests.conftest import FakeGrid
    from tests.test_federation import config, initial

    cfg = config(**{"min-available-nodes": 1, "min-train-nodes": 1, "min-evaluate-nodes": 1,
                    **kw})
    state = FederationState(0, initial(), MetricsHistory({}))
    state = run_round(FakeGrid(responders), build_strategy(cfg), cfg, state)  # type: ignore[arg-type]
    return state, state.history.rounds[-1]


@pytest.mark.faults
def test_hostile_updates_are_rejected_and_the_others_aggregate_as_without_them() -> None:
    from tests.test_federation import site

    good = {1: site("a", {"w": np.array([1.0, 2.0]), "b": np.array([[1.0, 1.0]])}, 10, 0.8),
            2: site("b", {"w": np.array([3.0, 2.0]), "b": np.array([[1.0, 3.0]])}, 30, 0.9)}
    bad = {
        3: site("nan", {"w": np.array([np.nan, 0.0]), "b": np.zeros((1, 2))}, 10, 0.1),
        4: site("scaled", {"w": np.array([1000.0, 2000.0]), "b": np.array([[1e3, 1e3]])},
                10, 0.1),
        5: site("shape", {"w": np.zeros(3), "b": np.zeros((1, 2))}, 10, 0.1),
    }
    clean, _ = _round(good)
    state, record = _round({**good, **bad})
    for key in ("w", "b"):
        np.testing.assert_array_equal(state.weights[key], clean.weights[key])  # type: ignore[attr-defined]
    errors = {s.site: s.error for s in record.sites}  # type: ignore[attr-defined]
    assert errors["a"] is None and errors["b"] is None
    assert "NaN" in errors["nan"] or "non-finite" in errors["nan"] or "finite" in errors["nan"]
    assert errors["scaled"].startswith("train: update rejected (update norm")
    assert errors["shape"] == ("train: update rejected (parameter 'w' has shape (3,), "
                               "expected (2,))")


@pytest.mark.faults
def test_an_exploding_server_step_keeps_the_previous_model() -> None:
    from tests.test_federation import initial, site

    sites = {1: site("a", {"w": np.array([1.0, 2.0]), "b": np.array([[1.0, 1.0]])}, 10, 0.8)}
    state, record = _round(sites, strategy="fedadam", **{"server-learning-rate": 1e30})
    assert record.step_refused is not None and "lower server-learning-rate" in record.step_refused  # type: ignore[attr-defined]
    assert record.aggregated is False  # type: ignore[attr-defined]
    for key, value in initial().items():
        np.testing.assert_array_equal(state.weights[key], value)  # type: ignore[attr-defined]


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_strategies_aggregate(strategy: str) -> None:
    from tests.test_federation import site

    sites = {n: site(f"s{n}", {"w": np.array([float(n), 0.0]), "b": np.zeros((1, 2))}, 1, 0.5)
             for n in (1, 2, 3, 4, 5)}
    state, record = _round(sites, strategy=strategy)
    assert record.aggregated  # type: ignore[attr-defined]
    chosen = state.weights["w"][0]  # type: ignore[attr-defined]
    # Median and trimmed mean (one cut at each end) give 3 exactly; Krum picks one site's
    # update among those closest to their neighbours (2, 3 and 4 tie), never an outer one.
    assert chosen == 3.0 if strategy != "krum" else chosen in (2.0, 3.0, 4.0), chosen
