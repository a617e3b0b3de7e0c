"""Deadlines and k of n: stragglers, vanished sites and late replies, on a scripted clock."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message

from server import deadline
from server.deadline import Decision, choose_nodes, phase_decision
from server.federation import FederationState, NotEnoughSitesError, run_round
from server.history import MetricsHistory
from server.strategies import build_strategy
from tests.conftest import FakeGrid
from tests.test_federation import config, initial, site

pytestmark = pytest.mark.faults


def test_choose_nodes_takes_all_with_fraction_one_and_sorts() -> None:
    assert choose_nodes([30, 10, 20], 1.0, 1, "s") == [10, 20, 30]
    assert choose_nodes([], 1.0, 2, "s") == []
    assert choose_nodes([5], 1.0, 3, "s") == [5]  # fewer than the minimum: all of them


def test_choose_nodes_fraction_and_minimum_are_flowers_rule_and_seeded() -> None:
    nodes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    state = random.getstate()
    half = choose_nodes(nodes, 0.5, 1, "0:1:0:train")
    assert random.getstate() == state  # the global generator is left alone
    assert len(half) == 5 and half == sorted(half) and set(half) <= set(nodes)
    assert choose_nodes(nodes, 0.5, 1, "0:1:0:train") == half
    assert choose_nodes(nodes, 0.25, 1, "x") == choose_nodes(nodes, 0.25, 1, "x")
    assert len(choose_nodes(nodes, 0.25, 1, "x")) == 2       # int(10 * 0.25)
    assert len(choose_nodes(nodes, 0.1, 4, "x")) == 4        # raised to the minimum
    draws = {tuple(choose_nodes(nodes, 0.3, 1, f"0:{r}:0:train")) for r in range(20)}
    assert len(draws) > 1  # the round is in the seed


@pytest.mark.parametrize(("now", "asked", "replied", "usable", "minimum", "expected"), [
    (0.0, 3, 3, 3, 2, Decision.PROCEED),   # everyone answered: go on before the deadline
    (0.0, 3, 2, 2, 2, Decision.WAIT),      # enough, but the third may still come in time
    (10.0, 3, 2, 2, 2, Decision.PROCEED),  # deadline passed with enough
    (10.0, 3, 1, 1, 2, Decision.SHORT),    # deadline passed with too few
    (11.0, 3, 0, 0, 0, Decision.PROCEED),  # no minimum (evaluation): the deadline ends it
    (0.0, 3, 2, 0, 2, Decision.SHORT),     # two errors: the last site cannot make it 2
    (0.0, 3, 3, 1, 2, Decision.SHORT),     # all answered, too few with weights
    (0.0, 2, 1, 1, 2, Decision.WAIT),
    (9.999, 2, 1, 1, 2, Decision.WAIT),
    (0.0, 0, 0, 0, 1, Decision.SHORT),     # nobody asked
])
def test_phase_decision(now: float, asked: int, replied: int, usable: int, minimum: int,
                        expected: Decision) -> None:
    assert phase_decision(now, 10.0, asked, replied, usable, minimum) is expected


def three_sites() -> dict[int, object]:
    # c's update passes validation but, weighted by 50 cases, would move the mean a long
    # way: any trace of it in the result shows.
    return {1: site("a", {"w": np.array([1.0, 2.0]), "b": np.array([[0.0, 8.0]])}, 1, 0.5),
            2: site("b", {"w": np.array([4.0, 8.0]), "b": np.array([[4.0, 0.0]])}, 3, 0.9),
            3: site("c", {"w": np.array([20.0, 20.0]), "b": np.array([[20.0, 20.0]])}, 50, 0.1)}


def run(grid: FakeGrid, rounds: int, **kw: object) -> FederationState:
    cfg = config(**{"min-available-nodes": 3, "round-timeout": 30.0, **kw})
    strategy = build_strategy(cfg)
    state = FederationState(0, initial(), MetricsHistory({}))
    for _ in range(rounds):
        state = run_round(grid, strategy, cfg, state, grid.clock)
    return state


def test_a_straggler_costs_the_deadline_and_its_late_reply_is_never_aggregated() -> None:
    grid = FakeGrid(three_sites(), delays={2: 5.0, 3: 100.0})  # type: ignore[arg-type]
    state = run(grid, rounds=2)
    first, second = state.history.rounds
    # Round 1 went on at its deadline with a and b: exactly their case-weighted mean.
    assert first.train_seconds == 30.0 and first.evaluate_seconds == 30.0
    assert first.aggregated and second.aggregated
    np.testing.assert_array_equal(state.weights["w"], np.array([3.25, 6.5]))
    np.testing.assert_array_equal(state.weights["b"], np.array([[3.0, 2.0]]))
    # c's round-1 training reply came at t = 100, during round 2: recorded under the
    # name it carries, not used.
    late = {s.site: s for s in first.sites}["c"]
    assert late.error == ("train: late reply after round-timeout, not aggregated; "
                          "evaluate: no reply within round-timeout")
    assert late.num_train_cases is None and late.train_loss is None
    assert {s.site: s.error for s in first.sites if s.site != "c"} == {"a": None, "b": None}
    assert grid.time.now == 120.0        # four phases, each ended by its deadline
    # Still unanswered: c's round-1 evaluation and both of its round-2 messages.
    assert sorted((a.server_round, a.phase) for a in state.late.values()) == [
        (1, "evaluate"), (2, "evaluate"), (2, "train")]


def test_a_round_goes_on_as_soon_as_every_site_replied() -> None:
    grid = FakeGrid(three_sites(), delays={2: 5.0, 3: 12.0})  # type: ignore[arg-type]
    state = run(grid, rounds=1)
    (rnd,) = state.history.rounds
    # Each phase ends at the first pull after the last reply (t = 12 s into it).
    for took in (rnd.train_seconds, rnd.evaluate_seconds):
        assert took is not None and 12.0 <= took <= 12.0 + deadline.poll_interval(12.0)
    assert all(s.error is None for s in rnd.sites)
    assert grid.time.now == rnd.train_seconds + rnd.evaluate_seconds


def test_the_wait_between_pulls_is_a_share_of_the_wait_so_far() -> None:
    assert [deadline.poll_interval(w) for w in (0.0, 0.2, 2.0, 12.0, 20.0, 3600.0)] == [
        0.02, 0.02, 0.1, 0.6000000000000001, 1.0, 1.0]


def test_without_stragglers_nothing_waits() -> None:
    grid = FakeGrid(three_sites())  # type: ignore[arg-type]
    run(grid, rounds=2)
    assert grid.time.now == 0.0


def test_a_round_short_of_its_minimum_is_retried_and_old_replies_stay_out() -> None:
    trains: list[int] = []

    def slow_first_time(msg: Message) -> float:
        if msg.metadata.message_type != "train":
            return 0.0
        trains.append(1)
        return 100.0 if len(trains) == 1 else 0.0

    grid = FakeGrid(three_sites(), delays={3: slow_first_time})  # type: ignore[arg-type]
    state = run(grid, rounds=2, **{"min-train-nodes": 3, "max-model-growth": 1e6})
    first = state.history.rounds[0]
    assert first.retries == 1 and first.train_seconds == 0.0 and first.aggregated
    # The second attempt had all three; c's first-attempt reply (t = 100) was not counted
    # twice and left the retried round's record alone.
    expected = (1 * np.array([1.0, 2.0]) + 3 * np.array([4.0, 8.0]) + 50 * np.array([20.0, 20.0])
                ) / 54
    np.testing.assert_allclose(state.weights["w"], expected, rtol=0, atol=1e-12)
    assert all(s.error is None for r in state.history.rounds for s in r.sites)
    assert state.history.rounds[1].retries == 0
    assert [m.metadata.message_type for m in grid.sent].count("train") == 3 + 3 + 3
    assert grid.time.now == 30.0  # only the failed attempt waited for its deadline


def test_errors_that_make_the_minimum_impossible_stop_waiting_at_once() -> None:
    def broken(msg: Message) -> Message:
        return Message(Error(code=9103, reason="the site ran out of memory"), reply_to=msg)

    sites = three_sites()
    sites[2] = broken  # type: ignore[assignment]
    grid = FakeGrid(sites, delays={3: 1000.0})  # type: ignore[arg-type]
    with pytest.raises(NotEnoughSitesError, match="in 2 attempts"):
        run(grid, rounds=1, **{"min-train-nodes": 2, "round-retries": 1})
    # With b failed, a and the straggler c could still make 2, so each attempt waited
    # for c until its deadline; the retry then stopped the run.
    assert grid.time.now == 60.0

    sites[3] = broken  # type: ignore[assignment]
    grid = FakeGrid(sites)  # type: ignore[arg-type]
    with pytest.raises(NotEnoughSitesError):
        run(grid, rounds=1, **{"min-train-nodes": 2, "round-retries": 1})
    assert grid.time.now == 0.0  # b and c both failed at once: no waiting at all


class VanishingGrid(FakeGrid):
    """Node 3 is listed for the coordinator's first look, then gone for good."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.looks = 0

    def get_node_ids(self) -> list[int]:
        self.looks += 1
        return [1, 2, 3] if self.looks == 1 else [1, 2]


def test_a_site_that_vanishes_never_hangs_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.serverapp.strategy.strategy_utils as flower_sampling

    def hang(seconds: float) -> None:
        raise AssertionError("Flower's sample_nodes waited for a site that is gone")

    monkeypatch.setattr(flower_sampling, "sleep", hang)
    sites = three_sites()
    sites[3] = lambda msg: None  # type: ignore[assignment]
    grid = VanishingGrid(sites)
    state = run(grid, rounds=1, **{"min-evaluate-nodes": 2})
    (rnd,) = state.history.rounds
    assert rnd.aggregated and rnd.train_seconds == 30.0
    # Evaluation asked only the sites connected when it began.
    evaluated = sorted(m.metadata.dst_node_id for m in grid.sent
                       if m.metadata.message_type == "evaluate")
    assert evaluated == [1, 2] and grid.time.now == 30.0


@pytest.mark.parametrize("strategy", [
    {"strategy": "fedprox", "proximal-mu": 0.5},
    {"strategy": "fedadam"},
    {"central-dp": "server-side", "central-dp-noise-multiplier": 0.0},
    {"central-dp": "client-side", "central-dp-noise-multiplier": 0.0},
    {"strategy": "fedmedian"},
])
def test_strategies_build_their_messages_for_the_chosen_sites(strategy: dict[str, object]
                                                             ) -> None:
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from shared import protocol as p

    grid = FakeGrid(three_sites(), delays={3: 100.0})  # type: ignore[arg-type]
    state = run(grid, rounds=1, **strategy)
    assert state.history.rounds[0].aggregated
    assert np.all(np.isfinite(state.weights["w"])) and np.all(np.abs(state.weights["w"]) < 100)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert sorted(m.metadata.dst_node_id for m in train) == [1, 2, 3]
    sent = train[0].content.config_records[p.CONFIG]
    if strategy.get("strategy") == "fedprox":
        assert sent["proximal-mu"] == 0.5
    assert (KEY_CLIPPING_NORM in sent) == (strategy.get("central-dp") == "client-side")


def test_round_retries_is_a_declared_key() -> None:
    from shared.errors import ConfigError

    assert config().round_retries == 2
    assert config(**{"round-retries": 0}).round_retries == 0
    with pytest.raises(ConfigError, match="round-retries"):
        config(**{"round-retries": -1})


def test_the_failed_rounds_record_names_every_attempt(tmp_path: Path) -> None:
    from server.federation import RunFolder, run_federation

    sites = three_sites()
    sites[3] = lambda msg: None  # type: ignore[assignment]
    grid = FakeGrid(sites)  # type: ignore[arg-type]
    cfg = config(**{"min-available-nodes": 3, "min-train-nodes": 3, "round-timeout": 30.0,
                    "round-retries": 1, "num-server-rounds": 2})
    folder = RunFolder(tmp_path)

    class Silent:
        def round_finished(self, record: object, num_rounds: int) -> None:
            pass

    with pytest.raises(NotEnoughSitesError, match="in the last, 2 of the 3 sites asked did"):
        run_federation(grid, cfg, initial(), folder, Silent(), clock=grid.clock)
    (failed,) = MetricsHistory.read(folder.metrics_json).rounds
    assert failed.retries == 1
    assert {s.site: s.error for s in failed.sites}["node-3"] == (
        "train: no reply within round-timeout")
