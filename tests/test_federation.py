"""The server's round loop, on a fake Grid with hand-made replies (exact values)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from client.app import train_reply
from client.config import SiteConfig
from client.trainer import TrainResult
from server.config import RunConfig
from server.federation import (
    FederationState,
    NotEnoughSitesError,
    RunFolder,
    run_federation,
    run_round,
    wait_for_nodes,
)
from server.history import MetricsHistory
from server.strategies import build_strategy
from shared import protocol as p
from shared.checkpoint import Checkpoint
from shared.config import TrainPlan
from shared.run_files import RunFiles
from shared.settings import SettingError
from tests.conftest import FakeGrid, fingerprint_reply


def site(name: str, weights: dict[str, np.ndarray], n_train: int, dice: float,
         n_val: int = 2, loss: float = 0.5, eval_extra: dict[str, float] | None = None):
    """Return a responder that answers train with fixed weights and evaluate with ``dice``."""

    def respond(msg: Message) -> Message:
        tag = ConfigRecord({p.SITE_NAME: name})
        if msg.metadata.message_type == "train":
            return Message(RecordDict({
                p.ARRAYS: ArrayRecord({k: Array(v) for k, v in weights.items()}),
                p.METRICS: MetricRecord({p.NUM_EXAMPLES: n_train, p.TRAIN_LOSS: loss,
                                         p.TRAIN_STEPS: 3}),
                p.SITE: tag,
            }), reply_to=msg)
        return Message(RecordDict({
            p.METRICS: MetricRecord({p.NUM_EXAMPLES: n_val, p.VAL_DICE: dice,
                                     **(eval_extra or {})}),
            p.SITE: tag,
        }), reply_to=msg)

    return respond


def config(**kw: object) -> RunConfig:
    values = {"min-available-nodes": 2, "min-train-nodes": 2, "min-evaluate-nodes": 2,
              "node-wait-timeout": 1.0}
    values.update(kw)
    return RunConfig.from_user_config(values)


def initial() -> dict[str, np.ndarray]:
    return {"w": np.zeros(2), "b": np.zeros((1, 2))}


def test_fedavg_is_exact_case_weighted_mean(tmp_path: Path) -> None:
    grid = FakeGrid({
        11: site("a", {"w": np.array([1.0, 2.0]), "b": np.array([[0.0, 8.0]])}, 1, 0.5),
        22: site("b", {"w": np.array([4.0, 8.0]), "b": np.array([[4.0, 0.0]])}, 3, 0.9),
    })
    cfg = config(**{"num-server-rounds": 1})
    folder = RunFolder(tmp_path)
    state = run_federation(grid, cfg, initial(), folder, reporter=_Silent())  # type: ignore[arg-type]
    # (1*[1,2] + 3*[4,8]) / 4 and (1*[0,8] + 3*[4,0]) / 4
    np.testing.assert_array_equal(state.weights["w"], np.array([3.25, 6.5]))
    np.testing.assert_array_equal(state.weights["b"], np.array([[3.0, 2.0]]))
    saved = Checkpoint.load(folder.final_model).weights
    np.testing.assert_array_equal(saved["w"], np.array([3.25, 6.5]))
    np.testing.assert_array_equal(Checkpoint.load(folder.checkpoint(1)).weights["b"],
                                  np.array([[3.0, 2.0]]))
    rnd = state.history.rounds[0]
    assert [(s.site, s.num_train_cases, s.val_dice) for s in rnd.sites] == [
        ("a", 1, 0.5), ("b", 3, 0.9)]
    assert rnd.mean_val_dice == pytest.approx((0.5 * 2 + 0.9 * 2) / 4)
    # The history on disk is the same object, as JSON and CSV.
    assert MetricsHistory.read(folder.metrics_json).rounds[0].sites[1].val_dice == 0.9
    csv_lines = folder.metrics_csv.read_text().splitlines()
    assert csv_lines[0].startswith("round,site,node_id")
    assert csv_lines[1].startswith("1,a,11,1,0.5,3,2,0.5")


def test_each_structures_dice_is_recorded_shown_and_written(tmp_path: Path) -> None:
    from server.report import format_round, format_summary

    classes = {f"{p.VAL_DICE_CLASS}1": 0.75, f"{p.VAL_DICE_CLASS}2": 0.25}
    grid = FakeGrid({
        11: site("a", initial(), 1, 0.5, eval_extra=classes),
        22: site("b", initial(), 1, 0.9),
        # Classes 1 and 3 without 2: a malformed reply, recorded against its site.
        33: site("c", initial(), 1, 0.5, eval_extra={f"{p.VAL_DICE_CLASS}1": 0.5,
                                                     f"{p.VAL_DICE_CLASS}3": 0.5}),
    })
    folder = RunFolder(tmp_path)
    state = run_federation(grid, config(**{"num-server-rounds": 1}), initial(), folder,
                           reporter=_Silent())  # type: ignore[arg-type]
    a, b, c = state.history.rounds[0].sites
    assert a.val_dice_per_class == [0.75, 0.25] and b.val_dice_per_class is None
    assert c.error is not None and "'val-dice-class-N' sent for classes [1, 3]" in c.error
    # Its Dice counts nowhere: the round's mean is a's and b's.
    assert c.val_dice is None
    assert state.history.rounds[0].mean_val_dice == pytest.approx(0.7)
    assert MetricsHistory.read(folder.metrics_json).rounds[0].sites[0].val_dice_per_class == [
        0.75, 0.25]
    row = folder.metrics_csv.read_text().splitlines()[1]
    assert row == "1,a,11,1,0.5,3,2,0.5,,,,,0.75 0.25,,"
    shown = "  a              val Dice 0.500 [by class 0.750 / 0.250] (2 cases)"
    assert any(line.startswith(shown) for line in format_round(state.history.rounds[0], 1))
    assert format_summary(state.history)[-1] == (
        "final Dice by class: a 0.750 / 0.250  (classes 1 to 2)")


def test_round_sends_model_and_plan_to_every_site() -> None:
    grid = FakeGrid({1: site("a", initial(), 1, 0.5), 2: site("b", initial(), 1, 0.5)})
    cfg = config(strategy="fedprox", **{"proximal-mu": 0.25, "local-steps": 7})
    state = FederationState(0, initial(), MetricsHistory({}))
    run_round(grid, build_strategy(cfg), cfg, state)
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert sorted(m.metadata.dst_node_id for m in train_msgs) == [1, 2]
    sent = train_msgs[0].content.config_records[p.CONFIG]
    assert sent["proximal-mu"] == 0.25
    assert sent["local-steps"] == 7
    assert sent["server-round"] == 1
    assert sent["model-patch-size"] == "64,64"


@pytest.mark.faults
def test_failed_and_silent_sites_are_recorded_and_excluded() -> None:
    def broken(msg: Message) -> Message:
        return Message(Error(code=0, reason="disk full"), reply_to=msg)

    grid = FakeGrid({
        1: site("a", {"w": np.array([2.0, 2.0]), "b": np.ones((1, 2))}, 2, 0.7),
        2: broken,
        3: lambda msg: None,
    })
    cfg = config(**{"min-train-nodes": 1, "min-evaluate-nodes": 1, "round-timeout": 30.0})
    state = run_round(grid, build_strategy(cfg), cfg,
                      FederationState(0, initial(), MetricsHistory({})), grid.clock)
    np.testing.assert_array_equal(state.weights["w"], np.array([2.0, 2.0]))
    errors = {s.node_id: s.error for s in state.history.rounds[0].sites}
    assert errors[1] is None
    assert errors[2] == "train: disk full; evaluate: disk full"
    assert errors[3] == ("train: no reply within round-timeout; "
                         "evaluate: no reply within round-timeout")
    # Each phase waited for the silent site until its deadline, and not longer.
    assert grid.time.now == 60.0


@pytest.mark.faults
def test_superlink_error_for_a_dead_site_is_recorded_under_that_site() -> None:
    alive = True

    def mortal(msg: Message) -> Message | None:
        if alive:
            return site("c", {"w": np.ones(2), "b": np.ones((1, 2))}, 1, 0.5)(msg)
        # The SuperLink, not the site, answers once the site misses its heartbeats.
        reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = 1
        return reply

    grid = FakeGrid({7: site("a", {"w": np.ones(2), "b": np.ones((1, 2))}, 1, 0.5),
                     9: mortal})
    cfg = config(**{"min-train-nodes": 1, "min-evaluate-nodes": 1})
    strategy = build_strategy(cfg)
    state = run_round(grid, strategy, cfg, FederationState(0, initial(), MetricsHistory({})))
    alive = False
    state = run_round(grid, strategy, cfg, state)
    second = {s.site: s for s in state.history.rounds[1].sites}
    assert sorted(second) == ["a", "c"]
    assert second["c"].node_id == 9 and "Node Unavailable" in str(second["c"].error)
    assert second["a"].error is None and state.history.rounds[1].aggregated


@pytest.mark.faults
def test_too_few_replies_are_retried_then_stop_the_run(tmp_path: Path) -> None:
    grid = FakeGrid({1: site("a", {"w": np.ones(2), "b": np.ones((1, 2))}, 1, 0.5),
                     2: lambda msg: None})
    cfg = config(**{"round-timeout": 30.0, "round-retries": 2})
    folder = RunFolder(tmp_path)
    with pytest.raises(NotEnoughSitesError) as err:
        run_federation(grid, cfg, initial(), folder, reporter=_Silent(),  # type: ignore[arg-type]
                       clock=grid.clock)
    message = str(err.value)
    assert message.startswith("round 1: in 3 attempts, fewer than min-train-nodes (2) sites "
                              "sent weights within round-timeout (30 s); in the last, 1 of the "
                              "2 sites asked did")
    assert "round-retries" in message and "min-train-nodes" in message
    # Three attempts, each to both sites and each ended by its deadline; no evaluation.
    assert [m.metadata.message_type for m in grid.sent] == ["train"] * 6
    assert grid.time.now == 90.0
    (failed,) = MetricsHistory.read(folder.metrics_json).rounds
    assert (failed.retries, failed.aggregated) == (2, False)
    assert {s.site: s.error for s in failed.sites} == {
        "a": None, "node-2": "train: no reply within round-timeout"}
    assert not folder.final_model.exists() and not folder.checkpoint(1).exists()


@pytest.mark.faults
def test_waiting_for_sites_ends_with_a_clear_error() -> None:
    clock = iter(range(100))
    with pytest.raises(NotEnoughSitesError, match="only 1 of the 3 required sites"):
        wait_for_nodes(FakeGrid({1: site("a", initial(), 1, 0.5)}), 3, timeout=5,  # type: ignore[arg-type]
                       clock=lambda: float(next(clock)), sleep=lambda s: None)


class _Silent:
    def round_finished(self, record: object, num_rounds: int) -> None:
        pass


def real_reply_site(name: str, weights: dict[str, np.ndarray], n_train: int,
                    noise_std: float | None = None):
    """Return a responder whose train replies are built by the ClientApp's own ``train_reply``.

    With ``noise_std`` the site reports a DP-SGD round with that noise.
    """

    def respond(msg: Message) -> Message:
        if msg.metadata.message_type != "train":
            return site(name, weights, n_train, 0.5)(msg)
        plan = TrainPlan.from_config(msg.content.config_records[p.CONFIG])
        dp = {} if noise_std is None else {"epsilon": 1.0, "delta": 1e-5,
                                           "noise_std": noise_std}
        result = TrainResult(weights=weights, num_examples=n_train, train_loss=0.5, steps=3,
                             **dp)  # type: ignore[arg-type]
        site_config = SiteConfig(data_path=Path(name), site_name=name)
        return train_reply(msg, site_config, result, plan.uniform_weights)

    return respond


@pytest.mark.parametrize(("weighting", "w", "b"), [
    ("cases", [3.25, 6.5], [[3.0, 2.0]]),  # (1*[1,2] + 3*[4,8]) / 4, (1*[0,8] + 3*[4,0]) / 4
    ("equal", [2.5, 5.0], [[2.0, 4.0]]),   # ([1,2] + [4,8]) / 2, ([0,8] + [4,0]) / 2
])
def test_site_weighting_sets_each_updates_weight_exactly(
        weighting: str, w: list[float], b: list[list[float]]) -> None:
    grid = FakeGrid({
        11: real_reply_site("a", {"w": np.array([1.0, 2.0]), "b": np.array([[0.0, 8.0]])}, 1),
        22: real_reply_site("b", {"w": np.array([4.0, 8.0]), "b": np.array([[4.0, 0.0]])}, 3),
    })
    cfg = config(**{"site-weighting": weighting})
    state = run_round(grid, build_strategy(cfg), cfg,
                      FederationState(0, initial(), MetricsHistory({})))
    np.testing.assert_array_equal(state.weights["w"], np.array(w))
    np.testing.assert_array_equal(state.weights["b"], np.array(b))
    # The history still records each site's real number of training cases.
    assert [(s.site, s.num_train_cases) for s in state.history.rounds[0].sites] == [
        ("a", 1), ("b", 3)]


@pytest.mark.parametrize(("noise", "weights", "w", "b"), [
    # Noise 0.5 and 0.25: weights 1 / 0.25 = 4 and 1 / 0.0625 = 16, whatever the cases.
    ((0.5, 0.25), [4.0, 16.0], [3.4, 6.8], [[3.2, 1.6]]),
    # Site a without DP-SGD weighs as the least noisy DP-SGD site: equal here.
    ((None, 0.25), [16.0, 16.0], [2.5, 5.0], [[2.0, 4.0]]),
])
def test_dp_noise_weighting_weighs_updates_by_inverse_noise_variance(
        noise: tuple[float | None, float], weights: list[float], w: list[float],
        b: list[list[float]]) -> None:
    grid = FakeGrid({
        11: real_reply_site("a", {"w": np.array([1.0, 2.0]), "b": np.array([[0.0, 8.0]])}, 1,
                            noise[0]),
        22: real_reply_site("b", {"w": np.array([4.0, 8.0]), "b": np.array([[4.0, 0.0]])}, 3,
                            noise[1]),
    })
    cfg = config(**{"site-weighting": "dp-noise"})
    state = run_round(grid, build_strategy(cfg), cfg,
                      FederationState(0, initial(), MetricsHistory({})))
    np.testing.assert_allclose(state.weights["w"], np.array(w), rtol=1e-12)
    np.testing.assert_allclose(state.weights["b"], np.array(b), rtol=1e-12)
    sites = state.history.rounds[0].sites
    assert [(s.weight, s.noise_std, s.num_train_cases) for s in sites] == [
        (weights[0], noise[0] or 0.0, 1), (weights[1], noise[1], 3)]


def test_dp_noise_weighting_rejects_a_dp_update_without_its_noise() -> None:
    def old_site(msg: Message) -> Message:
        reply = real_reply_site("a", {"w": np.ones(2), "b": np.ones((1, 2))}, 1, 0.5)(msg)
        if msg.metadata.message_type == "train":
            del reply.content.config_records[p.PRIVACY][p.NOISE_STD]
        return reply

    grid = FakeGrid({11: old_site, 22: real_reply_site("b", initial(), 3, 0.25)})
    cfg = config(**{"site-weighting": "dp-noise"})
    state = run_round(grid, build_strategy(cfg), cfg,
                      FederationState(0, initial(), MetricsHistory({})))
    a, b = state.history.rounds[0].sites
    assert a.error == ("train: update rejected (site-weighting 'dp-noise' needs the site's "
                       "'noise-std'; update fedseg at that site)")
    # One of the two required updates is left: the global model stays as it was.
    assert not state.history.rounds[0].aggregated and b.error is None
    np.testing.assert_array_equal(state.weights["w"], np.zeros(2))


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_a_bad_reported_noise_is_the_sites_error(bad: float) -> None:
    def liar(msg: Message) -> Message:
        reply = real_reply_site("a", {"w": np.ones(2), "b": np.ones((1, 2))}, 1, 0.5)(msg)
        if msg.metadata.message_type == "train":
            reply.content.config_records[p.PRIVACY][p.NOISE_STD] = bad
        return reply

    grid = FakeGrid({11: liar, 22: real_reply_site("b", initial(), 3, 0.25)})
    cfg = config(**{"site-weighting": "dp-noise", "min-train-nodes": 1})
    state = run_round(grid, build_strategy(cfg), cfg,
                      FederationState(0, initial(), MetricsHistory({})))
    a, b = state.history.rounds[0].sites
    assert a.error is not None and a.error.startswith(
        f"train: malformed reply ('noise-std' is {bad}, expected ")
    # b alone is aggregated, with its own weight.
    assert b.weight == 16.0 and state.history.rounds[0].aggregated
    np.testing.assert_array_equal(state.weights["w"], np.zeros(2))


def test_an_unknown_site_weighting_is_refused_with_the_choices() -> None:
    with pytest.raises(SettingError,
                       match="'site-weighting': must be one of cases, equal, dp-noise, got "
                             "'even'"):
        config(**{"site-weighting": "even"})


def test_server_side_central_dp_clips_each_update_exactly() -> None:
    # Updates of norm 5 and 10 from a zero model, clipped to norm 1, noise 0, uniform weights.
    grid = FakeGrid({
        1: site("a", {"w": np.array([3.0, 4.0]), "b": np.zeros((1, 2))}, 1, 0.5),
        2: site("b", {"w": np.array([0.0, 0.0]), "b": np.array([[6.0, 8.0]])}, 1, 0.5),
    })
    cfg = config(**{"central-dp": "server-side", "central-dp-noise-multiplier": 0.0,
                    "central-dp-clipping-norm": 1.0})
    assert cfg.round_config(1)["uniform-weights"] is True
    state = run_round(grid, build_strategy(cfg), cfg,
                      FederationState(0, initial(), MetricsHistory({})))
    np.testing.assert_allclose(state.weights["w"], [0.3, 0.4])
    np.testing.assert_allclose(state.weights["b"], [[0.3, 0.4]])


def test_server_side_central_dp_takes_an_update_equal_to_the_global_model() -> None:
    # Site "b" sends the global model back unchanged (every step skipped, say):
    # its update has norm 0, which Flower's clipping divides by.
    grid = FakeGrid({
        1: site("a", {"w": np.array([3.0, 4.0]), "b": np.zeros((1, 2))}, 1, 0.5),
        2: site("b", initial(), 1, 0.5),
    })
    cfg = config(**{"central-dp": "server-side", "central-dp-noise-multiplier": 0.0,
                    "central-dp-clipping-norm": 1.0})
    state = run_round(grid, build_strategy(cfg), cfg,
                      FederationState(0, initial(), MetricsHistory({})))
    np.testing.assert_allclose(state.weights["w"], [0.3, 0.4])
    np.testing.assert_allclose(state.weights["b"], [[0.0, 0.0]])


def test_client_side_clipping_mod_clips_and_passes_refusals() -> None:
    from flwr.app import Context
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from client.app import clip_update_mod

    grid = FakeGrid({1: site("a", initial(), 1, 0.5)})
    cfg = config(**{"min-available-nodes": 1, "min-train-nodes": 1, "min-evaluate-nodes": 1})
    (msg,) = build_strategy(cfg).configure_train(
        1, ArrayRecord({"w": Array(np.zeros(2))}),
        ConfigRecord({KEY_CLIPPING_NORM: 1.0}), grid)  # type: ignore[arg-type]
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def trained(m: Message, c: Context) -> Message:
        return Message(RecordDict({p.ARRAYS: ArrayRecord({"w": Array(np.array([3.0, 4.0]))}),
                                   p.METRICS: MetricRecord({p.NUM_EXAMPLES: 1})}), reply_to=m)

    def refused(m: Message, c: Context) -> Message:
        return Message(RecordDict({p.METRICS: MetricRecord({p.NUM_EXAMPLES: 0}),
                                   p.PRIVACY: ConfigRecord({p.REFUSED: True})}), reply_to=m)

    out = clip_update_mod(msg, ctx, trained)
    np.testing.assert_allclose(out.content.array_records[p.ARRAYS]["w"].numpy(), [0.6, 0.8])
    passed = clip_update_mod(msg, ctx, refused)
    assert not passed.has_error() and passed.content.config_records[p.PRIVACY][p.REFUSED]

    def unchanged(m: Message, c: Context) -> Message:
        return Message(RecordDict({p.ARRAYS: ArrayRecord({"w": Array(np.zeros(2))}),
                                   p.METRICS: MetricRecord({p.NUM_EXAMPLES: 1})}), reply_to=m)

    # A zero update (norm 0, which Flower's mod divides by) is its own clip.
    same = clip_update_mod(msg, ctx, unchanged)
    assert not same.has_error()
    np.testing.assert_array_equal(same.content.array_records[p.ARRAYS]["w"].numpy(), [0.0, 0.0])


def test_deployed_server_app_parses_run_config_from_context(tmp_path: Path) -> None:
    import tomllib

    from flwr.app import Context

    from server.app import make_server_app
    from tests.conftest import REPO

    run_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"]
    run_config.update({"num-server-rounds": 1, "local-steps": 2, "channels": "8,16",
                       "patch-size": "16,16", "output-dir": str(tmp_path)})
    said: list[str] = []
    app = make_server_app(reporter=_Silent(), echo=said.append)
    names = None

    def respond(msg: Message) -> Message:
        nonlocal names
        if msg.metadata.message_type == p.FINGERPRINT_QUERY:
            # pyproject leaves the planned keys at "auto": the app asks for a fingerprint.
            return fingerprint_reply(msg)
        arrays = msg.content.array_records[p.ARRAYS]
        names = list(arrays.keys())
        return site("a", {k: v.numpy() for k, v in arrays.items()}, 1, 0.5)(msg)

    context = Context(run_id=42, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    app(FakeGrid({1: respond}), context)  # type: ignore[arg-type]
    assert RunFiles(tmp_path / "run-42").final_model.is_file()
    assert names and all(not n.startswith("_module") for n in names)
    spec = Checkpoint.load(RunFiles(tmp_path / "run-42").final_model).spec
    assert spec.channels == (8, 16)                      # set in the run config: kept
    assert (spec.in_channels, spec.normalization) == (3, "zscore-fov")  # "auto": planned
    recorded = json.loads(RunFiles(tmp_path / "run-42").plan_json.read_text())["run-config"]
    # One round of 2 steps asked for: the recorded fine-tune is one round of the user's steps.
    assert (recorded["personalization"], recorded["finetune-steps"]) == ("finetune", 2)
    assert "plan: the run config's rounds or steps make the deployed fine-tune 2 steps" in said
    changed = [line for line in said if line.startswith("plan: the run config sets ")]
    assert changed == ["plan: the run config sets channels='8,16' (planned '16,32'), "
                       "local-steps=2 (planned 150), num-server-rounds=1 (planned 25)"]


@pytest.mark.faults
def test_malformed_reply_is_recorded_and_left_out() -> None:
    def bad_loss(msg: Message) -> Message:
        reply = site("b", {"w": np.full(2, 100.0), "b": np.ones((1, 2))}, 5, 0.5)(msg)
        if msg.metadata.message_type == "train":
            reply.content.metric_records[p.METRICS][p.TRAIN_LOSS] = float("nan")
        return reply

    grid = FakeGrid({1: site("a", {"w": np.array([2.0, 2.0]), "b": np.ones((1, 2))}, 2, 0.7),
                     2: bad_loss})
    cfg = config(**{"min-train-nodes": 1})
    state = run_round(grid, build_strategy(cfg), cfg,
                      FederationState(0, initial(), MetricsHistory({})))
    np.testing.assert_array_equal(state.weights["w"], [2.0, 2.0])  # b's update left out
    errors = {s.site: s.error for s in state.history.rounds[0].sites}
    assert errors["a"] is None and "train-loss" in str(errors["b"])
