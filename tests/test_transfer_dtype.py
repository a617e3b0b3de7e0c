"""transfer-dtype: float16 shared weights on the wire, float32 everywhere else (exact values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from server.config import RunConfig
from server.federation import FederationState, run_round
from server.history import MetricsHistory
from server.strategies import build_strategy
from server.validation import update_problem
from shared import protocol as p
from shared.errors import ConfigError
from shared.weights import (
    as_dtypes,
    as_float32,
    for_wire,
    from_record,
    payload_bytes,
    to_record,
)
from tests.conftest import FakeGrid
from tests.test_federation import site


def _arrays() -> dict[str, np.ndarray]:
    return {
        "w": np.array([[0.5, -1.25], [3.0, 0.1]], np.float32),
        "b": np.array([1.0, 2.0, 65504.0], np.float32),
        "steps": np.array([7, 2**40], np.int64),
        "mask": np.array([True, False]),
    }


def test_float16_round_trip_of_hand_made_arrays_keeps_ints_and_bools() -> None:
    arrays = _arrays()
    sent = from_record(to_record(for_wire(arrays, "float16")))
    assert {k: v.dtype for k, v in sent.items()} == {
        "w": np.float16, "b": np.float16, "steps": np.int64, "mask": np.bool_}
    back = as_dtypes(sent, arrays)
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in arrays.items()}
    # Values float16 holds exactly come back exactly; 0.1 is rounded to float16's nearest.
    np.testing.assert_array_equal(back["w"], np.array([[0.5, -1.25], [3.0, 0.0999755859375]],
                                                      np.float32))
    np.testing.assert_array_equal(back["b"], arrays["b"])
    np.testing.assert_array_equal(back["steps"], np.array([7, 2**40]))
    np.testing.assert_array_equal(back["mask"], [True, False])
    # float32 transfer sends the arrays as they are.
    same = from_record(to_record(for_wire(arrays, "float32")))
    for name, value in arrays.items():
        assert same[name].dtype == value.dtype
        np.testing.assert_array_equal(same[name], value)
    # What a site does on arrival: floating point to float32, the rest as is.
    site_side = as_float32({"h": np.array([0.5], np.float16), "n": np.array([3], np.int32)})
    assert (site_side["h"].dtype, site_side["n"].dtype) == (np.float32, np.int32)


def test_float16_halves_the_bytes_of_the_record() -> None:
    floats = {k: v for k, v in _arrays().items() if v.dtype == np.float32}
    full = payload_bytes(to_record(for_wire(floats, "float32")))
    half = payload_bytes(to_record(for_wire(floats, "float16")))
    assert (full, half) == (7 * 4, 7 * 2)
    # Integer and boolean arrays keep their bytes.
    assert payload_bytes(to_record(for_wire(_arrays(), "float16"))) == 7 * 2 + 2 * 8 + 2


def _ref() -> dict[str, np.ndarray]:
    return {"w": np.zeros(2, np.float32), "n": np.zeros(1, np.int64)}


def test_the_expected_wire_dtype_follows_transfer_dtype() -> None:
    half = {"w": np.zeros(2, np.float16), "n": np.zeros(1, np.int64)}
    assert update_problem(_ref(), _ref()) is None
    assert update_problem(_ref(), half, "float16") is None
    assert update_problem(_ref(), half, "float32") == (
        "parameter 'w' has dtype float16, expected float32 (transfer-dtype float32)")
    assert update_problem(_ref(), _ref(), "float16") == (
        "parameter 'w' has dtype float32, expected float16 (transfer-dtype float16)")
    # Integer arrays are never cast, so they must arrive in their own dtype.
    assert update_problem(_ref(), {**half, "n": np.zeros(1, np.float16)}, "float16") == (
        "parameter 'n' has dtype float16, expected int64")


def _config(**kw: object) -> RunConfig:
    return RunConfig.from_user_config({"min-available-nodes": 2, "min-train-nodes": 1,
                                       "min-evaluate-nodes": 1, "node-wait-timeout": 1.0, **kw})


def _initial() -> dict[str, np.ndarray]:
    return {"w": np.array([0.5, 1.0], np.float32), "b": np.zeros((1, 2), np.float32)}


def _half(values: dict[str, list[float] | list[list[float]]]) -> dict[str, np.ndarray]:
    return {k: np.array(v, np.float16) for k, v in values.items()}


def test_float16_round_sends_and_takes_float16_and_aggregates_in_float32() -> None:
    grid = FakeGrid({
        1: site("a", _half({"w": [1.0, 2.0], "b": [[0.0, 8.0]]}), 1, 0.5),
        2: site("b", _half({"w": [4.0, 8.0], "b": [[4.0, 0.0]]}), 3, 0.9),
    })
    cfg = _config(**{"transfer-dtype": "float16"})
    assert cfg.round_config(1)["transfer-dtype"] == "float16"
    state = run_round(grid, build_strategy(cfg), cfg,  # type: ignore[arg-type]
                      FederationState(0, _initial(), MetricsHistory({})))
    assert state.history.rounds[0].aggregated
    # (1*[1,2] + 3*[4,8]) / 4 and (1*[0,8] + 3*[4,0]) / 4, held as float32.
    assert {k: v.dtype for k, v in state.weights.items()} == {"w": np.float32, "b": np.float32}
    np.testing.assert_array_equal(state.weights["w"], np.array([3.25, 6.5], np.float32))
    np.testing.assert_array_equal(state.weights["b"], np.array([[3.0, 2.0]], np.float32))
    # Both phases' messages carried float16.
    assert {m.metadata.message_type for m in grid.sent} == {"train", "evaluate"}
    for msg in grid.sent:
        assert {a.dtype for a in msg.content.array_records[p.ARRAYS].values()} == {"float16"}


def test_a_reply_in_the_other_precision_is_rejected_with_the_reason() -> None:
    for transfer, wrong in (("float32", np.float16), ("float16", np.float32)):
        grid = FakeGrid({
            1: site("good", {k: v.astype(np.float16 if transfer == "float16" else np.float32)
                             for k, v in _initial().items()}, 1, 0.5),
            2: site("wrong", {k: v.astype(wrong) for k, v in _initial().items()}, 1, 0.5),
        })
        cfg = _config(**{"transfer-dtype": transfer})
        state = run_round(grid, build_strategy(cfg), cfg,  # type: ignore[arg-type]
                          FederationState(0, _initial(), MetricsHistory({})))
        errors = {s.site: s.error for s in state.history.rounds[0].sites}
        assert errors == {"good": None, "wrong": (
            f"train: update rejected (parameter 'w' has dtype {np.dtype(wrong)}, expected "
            f"{transfer} (transfer-dtype {transfer}))")}


@pytest.mark.parametrize("strategy,central_dp", [("fedadam", "off"), ("fedavg", "server-side")])
def test_strategies_keep_float32_state_under_float16(strategy: str, central_dp: str) -> None:
    grid = FakeGrid({1: site("a", _half({"w": [3.5, 5.0], "b": [[0.0, 0.0]]}), 1, 0.5)})
    cfg = _config(**{"transfer-dtype": "float16", "strategy": strategy, "central-dp": central_dp,
                     "central-dp-noise-multiplier": 0.0, "central-dp-clipping-norm": 5.0,
                     "min-available-nodes": 1})
    strategy_ = build_strategy(cfg)
    state = run_round(grid, strategy_, cfg,  # type: ignore[arg-type]
                      FederationState(0, _initial(), MetricsHistory({})))
    assert state.history.rounds[0].aggregated
    assert all(v.dtype == np.float32 for v in state.weights.values())
    if central_dp == "server-side":
        # The wrapper's reference is the server's float32 model; the update from it,
        # (3, 4, 0, 0), has norm 5 and passes the clipping unchanged.
        assert {a.dtype for a in strategy_.current_arrays.values()} == {"float32"}  # type: ignore[attr-defined]
        np.testing.assert_array_equal(state.weights["w"], np.array([3.5, 5.0], np.float32))
    else:
        assert {a.dtype for a in strategy_.current_arrays.values()} == {np.dtype(np.float32)}  # type: ignore[attr-defined]
        # FedAdam's own step is float64; the server keeps float32, so round 2 aggregates.
        state = run_round(grid, strategy_, cfg, state)  # type: ignore[arg-type]
        assert state.history.rounds[1].aggregated
        assert all(v.dtype == np.float32 for v in state.weights.values())


def test_fedadam_keeps_a_float32_model_under_float32_transfer() -> None:
    grid = FakeGrid({1: site("a", {"w": np.array([1.0, 2.0], np.float32),
                                   "b": np.zeros((1, 2), np.float32)}, 1, 0.5)})
    cfg = _config(strategy="fedadam", **{"min-available-nodes": 1})
    strategy = build_strategy(cfg)
    state = FederationState(0, _initial(), MetricsHistory({}))
    for _ in range(2):
        state = run_round(grid, strategy, cfg, state)  # type: ignore[arg-type]
    assert [r.aggregated for r in state.history.rounds] == [True, True]
    assert all(s.error is None for r in state.history.rounds for s in r.sites)
    assert all(v.dtype == np.float32 for v in state.weights.values())


def test_site_works_in_float32_and_replies_in_the_round_transfer_dtype() -> None:
    from client.app import transfer_dtype_mod

    seen: list[np.dtype] = []

    def handler(m: Message, c: Context) -> Message:
        weights = from_record(m.content.array_records[p.ARRAYS])
        seen.append(weights["w"].dtype)
        trained = {"w": weights["w"] + np.float32(0.25), "n": np.array([5], np.int64)}
        return Message(RecordDict({p.ARRAYS: to_record(trained),
                                   p.METRICS: MetricRecord({p.NUM_EXAMPLES: 1})}), reply_to=m)

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for transfer in ("float16", "float32"):
        cfg = _config(**{"transfer-dtype": transfer})
        incoming = for_wire({"w": np.array([0.5, 1.0], np.float32)}, transfer)
        msg = Message(RecordDict({p.ARRAYS: to_record(incoming),
                                  p.CONFIG: ConfigRecord(cfg.round_config(1))}),
                      message_type="train", dst_node_id=1)
        out = from_record(transfer_dtype_mod(msg, ctx, handler).content.array_records[p.ARRAYS])
        assert out["w"].dtype == np.dtype(transfer) and out["n"].dtype == np.int64
        np.testing.assert_array_equal(out["w"], [0.75, 1.25])
    assert seen == [np.float32, np.float32]


def test_client_side_central_dp_with_float16_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"central-dp.*'client-side' cannot be combined with "
                       r"transfer-dtype float16"):
        _config(**{"transfer-dtype": "float16", "central-dp": "client-side"})
    with pytest.raises(ConfigError, match=r"transfer-dtype.*did you mean 'float16'"):
        _config(**{"transfer-dtype": "float61"})


@pytest.mark.e2e
def test_float16_simulation_completes(tmp_path: Path) -> None:
    from shared.checkpoint import Checkpoint
    from simulations.simulate import SimulationRequest, run_simulation

    outcome = run_simulation(
        SimulationRequest(num_sites=2, cases_per_site=5, synthetic_size=32, output=tmp_path,
                          overrides={"num-server-rounds": 2, "local-steps": 2, "batch-size": 2,
                                     "patch-size": "32,32", "channels": "8,16",
                                     "transfer-dtype": "float16"}),
        echo=lambda line: None,
    )
    history = MetricsHistory.read(outcome.metrics_json)
    assert history.run_config["transfer_dtype"] == "float16"
    assert all(r.aggregated and all(s.error is None for s in r.sites) for r in history.rounds)
    assert len(history.rounds) == 2
    weights = Checkpoint.load(outcome.final_model).weights
    assert {w.dtype for w in weights.values()} == {np.dtype(np.float32)}


def test_array_record_dtype_strings_are_numpy_names() -> None:
    # The tests above compare Flower's Array.dtype (a string) with NumPy names.
    assert Array(np.zeros(1, np.float16)).dtype == "float16"
    assert ArrayRecord({"x": Array(np.zeros(1, np.float32))})["x"].dtype == "float32"
