"""dp-trainable: exact parameter groups, frozen parameters bit-identical, partial updates.

The site trains only its group and replies with exactly the group's shared
parameters; the server validates replies against that set, aggregates them with
any strategy and keeps every other parameter at its global value bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.accounting import calibrate_noise, sample_rate
from client.app import make_client_app
from client.config import SiteConfig
from client.privacy_ledger import PrivacyLedger
from client.trainer import SiteTrainer
from server.app import initial_weights
from server.config import RunConfig
from server.federation import FederationState, run_round
from server.history import MetricsHistory
from server.strategies import build_strategy
from shared import protocol as p
from shared.config import ModelSpec, TrainPlan
from shared.errors import ConfigError
from shared.networks import build_network
from shared.privacy import PrivacyRequest, SitePrivacy, resolve_privacy
from shared.trainable import (
    TRAINABLE,
    merge_trainable,
    shared_trainable_names,
    trainable_names,
)
from simulations.phantoms import write_synthetic_federation
from tests.conftest import FakeGrid

# A three-level U-Net: an inner and an outer up path, so "decoder" is more than the head.
THREE_LEVELS = ModelSpec(channels=(8, 16, 32), patch_size=(16, 16))
INNER_UP = "model.1.submodule.2."
OUTER_UP = "model.2."
DECODER = {
    INNER_UP + "0.conv.weight", INNER_UP + "0.conv.bias", INNER_UP + "0.adn.N.weight",
    INNER_UP + "0.adn.N.bias", INNER_UP + "0.adn.A.weight",
    INNER_UP + "1.conv.unit0.conv.weight", INNER_UP + "1.conv.unit0.conv.bias",
    INNER_UP + "1.conv.unit0.adn.N.weight", INNER_UP + "1.conv.unit0.adn.N.bias",
    INNER_UP + "1.conv.unit0.adn.A.weight",
    OUTER_UP + "0.conv.weight", OUTER_UP + "0.conv.bias", OUTER_UP + "0.adn.N.weight",
    OUTER_UP + "0.adn.N.bias", OUTER_UP + "0.adn.A.weight",
    OUTER_UP + "1.conv.unit0.conv.weight", OUTER_UP + "1.conv.unit0.conv.bias",
}
HEAD = {OUTER_UP + "1.conv.unit0.conv.weight", OUTER_UP + "1.conv.unit0.conv.bias"}
NORM_MODULES = ("model.0.conv.unit0.adn.N", "model.1.submodule.0.conv.unit0.adn.N",
                "model.1.submodule.1.submodule.conv.unit0.adn.N", INNER_UP + "0.adn.N",
                INNER_UP + "1.conv.unit0.adn.N", OUTER_UP + "0.adn.N")
NORMS = {f"{m}.{w}" for m in NORM_MODULES for w in ("weight", "bias")}


def test_groups_select_exactly_the_expected_parameters() -> None:
    net = build_network(THREE_LEVELS)
    every = {name for name, _ in net.named_parameters()}
    assert len(every) == 38
    assert trainable_names(net, "unet", "all") == every
    assert trainable_names(net, "unet", "decoder") == DECODER
    assert trainable_names(net, "unet", "head") == HEAD
    assert trainable_names(net, "unet", "norm+adapter") == NORMS
    assert set(TRAINABLE.names()) == {"all", "norm+adapter", "decoder", "head"}


def test_groups_follow_the_adapter_and_the_site_local_layers() -> None:
    adapted = build_network(ModelSpec(channels=(8, 16, 32), patch_size=(16, 16),
                                      adaptation="adapter"))
    group = trainable_names(adapted, "unet", "norm+adapter")
    assert group == {"backbone." + n for n in NORMS} | {"adapter.mix.weight", "adapter.mix.bias"}
    assert trainable_names(adapted, "unet", "decoder") == {"backbone." + n for n in DECODER}
    # What travels: the adapter is site-local, so only the norms are shared and trained.
    spec = ModelSpec(channels=(8, 16, 32), patch_size=(16, 16), adaptation="adapter")
    assert shared_trainable_names(spec, "norm+adapter") == {"backbone." + n for n in NORMS}
    local_norm = ModelSpec(channels=(8, 16, 32), patch_size=(16, 16), adaptation="local-norm")
    assert shared_trainable_names(local_norm, "decoder") == DECODER - NORMS


def test_other_networks_declare_their_decoder_and_head() -> None:
    basic = ModelSpec(network="basicunet", channels=(8, 8, 8, 8, 8, 8), patch_size=(32, 32))
    assert {n.split(".")[0] for n in shared_trainable_names(basic, "decoder")} == {
        "upcat_4", "upcat_3", "upcat_2", "upcat_1", "final_conv"}
    assert shared_trainable_names(basic, "head") == {"final_conv.weight", "final_conv.bias"}
    seg = ModelSpec(network="segresnet", channels=(8,), patch_size=(32, 32))
    assert {n.split(".")[0] for n in shared_trainable_names(seg, "decoder")} == {
        "up_samples", "up_layers", "conv_final"}
    assert shared_trainable_names(seg, "head") == {"conv_final.2.conv.weight",
                                                   "conv_final.2.conv.bias"}


def test_asking_for_names_leaves_the_random_stream_alone() -> None:
    shared_trainable_names.cache_clear()
    torch.manual_seed(3)
    shared_trainable_names(THREE_LEVELS, "decoder")
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))


def test_a_group_with_no_shared_parameter_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_user_config({"dp-trainable": "norm+adapter", "adaptation": "local-norm"})
    assert str(err.value).startswith("run config key 'dp-trainable': 'norm+adapter' leaves no "
                                     "shared parameter to train")
    with pytest.raises(ConfigError, match="did you mean 'decoder'"):
        RunConfig.from_user_config({"dp-trainable": "decoderr"})


def test_merge_is_exact_and_keeps_the_base_order() -> None:
    base = {"a": np.array([1.0, 2.0]), "b": np.array([3.0]), "c": np.array([[4.0]])}
    update = {"c": np.array([[-1.0]]), "a": np.array([9.0, 8.0]), "b": np.array([7.0])}
    merged = merge_trainable(base, update, {"c", "a"})
    assert list(merged) == ["a", "b", "c"]
    assert merged["b"] is base["b"]
    np.testing.assert_array_equal(merged["a"], [9.0, 8.0])
    np.testing.assert_array_equal(merged["c"], [[-1.0]])
    assert merge_trainable(base, {"b": np.array([0.5])}, {"b"})["b"][0] == 0.5


# --- a DP round at a site --------------------------------------------------------------

SPEC = ModelSpec(channels=(8, 16), patch_size=(16, 16), adaptation="adapter")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("trainable-sites")
    return write_synthetic_federation(root, num_sites=2, cases_per_site=8, shape=(32, 32))


def dp_site(folder: Path, state: Path, **privacy: object) -> SiteConfig:
    return SiteConfig(data_path=folder, state_dir=state, device="cpu", num_threads=1,
                      val_fraction=0.25,
                      privacy=SitePrivacy(enabled=True, **privacy))  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["decoder", "norm+adapter"])
def test_dp_round_leaves_frozen_parameters_bit_identical(sites: list[Path], tmp_path: Path,
                                                         mode: str) -> None:
    site = dp_site(sites[0], tmp_path, noise_multiplier=1.0)
    trainer = SiteTrainer(site, SPEC)
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    result = trainer.train(trainer.weights(), TrainPlan(local_steps=3, batch_size=2,
                                                        trainable=mode),
                           resolve_privacy(site.privacy, PrivacyRequest()))
    assert result.epsilon is not None and result.steps == 3
    after = trainer.net.state_dict()
    group = trainable_names(trainer.net, "unet", mode)
    frozen = [k for k in before if k not in group]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in group)
    # The reply: exactly the trained shared parameters, the local adapter never.
    expected = shared_trainable_names(SPEC, mode)
    assert set(result.weights) == expected
    if mode == "norm+adapter":
        assert expected == {n for n in group if not n.startswith("adapter.")}
        assert not torch.equal(before["adapter.mix.weight"], after["adapter.mix.weight"])
    for name, value in result.weights.items():
        np.testing.assert_array_equal(value, after[name].numpy())


def _train_message(weights: dict[str, np.ndarray], config: dict[str, object]) -> Message:
    return Message(RecordDict({
        p.ARRAYS: ArrayRecord({k: Array(v) for k, v in weights.items()}),
        p.CONFIG: ConfigRecord(config),  # type: ignore[arg-type]
    }), dst_node_id=1, message_type="train")


@pytest.mark.parametrize("clip", [False, True])
def test_the_reply_holds_exactly_the_trainable_shared_parameters(
        sites: list[Path], tmp_path: Path, clip: bool) -> None:
    site = dp_site(sites[0], tmp_path, noise_multiplier=1.0)
    cfg = RunConfig.from_user_config({"channels": "8,16", "patch-size": "16,16",
                                      "adaptation": "adapter", "dp-trainable": "decoder",
                                      "local-steps": 2, "batch-size": 2})
    start = initial_weights(cfg)
    config: dict[str, object] = dict(cfg.round_config(1))
    if clip:  # Flower's client-side clipping mod, as central-dp = client-side asks
        config[KEY_CLIPPING_NORM] = 0.01
    app = make_client_app(lambda ctx: site)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = app(_train_message(start, config), context)
    assert not reply.has_error()
    sent = {k: a.numpy() for k, a in reply.content.array_records[p.ARRAYS].items()}
    assert set(sent) == shared_trainable_names(cfg.model, "decoder")
    assert len(sent) == 7 and all(k.startswith("backbone.model.2.") for k in sent)
    if clip:
        norm = np.sqrt(sum(float(np.sum((sent[k] - start[k]) ** 2)) for k in sent))
        assert norm == pytest.approx(0.01, rel=1e-5)


def test_calibration_spreads_the_target_over_the_runs_rounds_by_default(
        sites: list[Path], tmp_path: Path) -> None:
    site = dp_site(sites[0], tmp_path, target_epsilon=8.0, max_epsilon=8.0)
    assert site.privacy.planned_rounds == 0
    trainer = SiteTrainer(site, ModelSpec(channels=(8, 16), patch_size=(16, 16)))
    result = trainer.train(trainer.weights(), TrainPlan(local_steps=2, batch_size=2,
                                                        num_rounds=3),
                           resolve_privacy(site.privacy, PrivacyRequest()))
    rate = sample_rate(2, trainer.num_train_cases)
    noise = PrivacyLedger.load(tmp_path).calibrated_noise
    assert noise == calibrate_noise(8.0, 1e-5, rate, 2 * 3, "rdp")
    assert result.epsilon is not None and result.epsilon < 8.0


# --- the server: partial updates with every strategy ----------------------------------

def _responder(name: str, weights: dict[str, np.ndarray], cases: int):  # type: ignore[no-untyped-def]
    def respond(msg: Message) -> Message:
        tag = ConfigRecord({p.SITE_NAME: name})
        if msg.metadata.message_type == "train":
            return Message(RecordDict({
                p.ARRAYS: ArrayRecord({k: Array(v) for k, v in weights.items()}),
                p.METRICS: MetricRecord({p.NUM_EXAMPLES: cases, p.TRAIN_LOSS: 0.5,
                                         p.TRAIN_STEPS: 3}),
                p.SITE: tag,
            }), reply_to=msg)
        return Message(RecordDict({p.METRICS: MetricRecord({p.NUM_EXAMPLES: 1, p.VAL_DICE: 0.5}),
                                   p.SITE: tag}), reply_to=msg)

    return respond


def _partial_round(strategy: str, **extra: object) -> tuple[dict[str, np.ndarray],
                                                             dict[str, np.ndarray],
                                                             frozenset[str], FederationState]:
    cfg = RunConfig.from_user_config({
        "channels": "8,16", "patch-size": "16,16", "dp-trainable": "head", "strategy": strategy,
        "min-available-nodes": 3, "min-train-nodes": 3, "min-evaluate-nodes": 3,
        "node-wait-timeout": 1.0, "update-norm-ratio": 1000.0, **extra})
    # Hand-made values: the global model at 0.5, three sites' heads at 1, 2 and 4.
    start = {k: np.full_like(v, 0.5) for k, v in initial_weights(cfg).items()}
    head = shared_trainable_names(cfg.model, "head")
    grid = FakeGrid({
        node: _responder(f"s{node}", {k: np.full_like(start[k], value) for k in head}, cases)
        for node, value, cases in ((1, 1.0, 1), (2, 2.0, 1), (3, 4.0, 2))})
    state = run_round(grid, build_strategy(cfg), cfg, FederationState(0, start,
                                                                      MetricsHistory({})))
    return start, state.weights, head, state


def test_fedavg_of_partial_updates_is_exact_and_keeps_the_rest() -> None:
    start, weights, head, state = _partial_round("fedavg")
    assert state.history.rounds[0].aggregated
    assert list(weights) == list(start)
    for name in head:  # (1 * 1 + 1 * 2 + 2 * 4) / 4
        np.testing.assert_array_equal(weights[name], np.full_like(start[name], 2.75))
    for name in set(start) - head:
        np.testing.assert_array_equal(weights[name], start[name])
        assert weights[name].dtype == start[name].dtype


@pytest.mark.parametrize("strategy,extra", [
    ("fedadam", {}), ("fedmedian", {}), ("fedtrimmedavg", {}), ("krum", {}),
    ("fedavg", {"central-dp": "server-side", "central-dp-noise-multiplier": 0.5}),
    ("fedavg", {"central-dp": "client-side", "central-dp-noise-multiplier": 0.5}),
])
def test_every_strategy_aggregates_partial_updates(strategy: str,
                                                   extra: dict[str, object]) -> None:
    start, weights, head, state = _partial_round(strategy, **extra)
    rnd = state.history.rounds[0]
    assert rnd.aggregated and not any(s.error for s in rnd.sites)
    for name in set(start) - head:  # bit for bit, noise and server steps notwithstanding
        np.testing.assert_array_equal(weights[name], start[name])
    assert all(np.all(np.isfinite(weights[k])) for k in head)
    assert any(not np.array_equal(weights[k], start[k]) for k in head)
    if strategy == "fedmedian":
        assert all(np.all(weights[k] == 2.0) for k in head)


def test_a_reply_outside_the_trainable_set_is_rejected() -> None:
    cfg = RunConfig.from_user_config({
        "channels": "8,16", "patch-size": "16,16", "dp-trainable": "head",
        "min-available-nodes": 2, "min-train-nodes": 1, "min-evaluate-nodes": 1,
        "node-wait-timeout": 1.0})
    start = initial_weights(cfg)
    head = shared_trainable_names(cfg.model, "head")
    grid = FakeGrid({1: _responder("honest", {k: start[k] + 1 for k in head}, 1),
                     2: _responder("everything", {k: v + 1 for k, v in start.items()}, 1)})
    state = run_round(grid, build_strategy(cfg), cfg, FederationState(0, start,
                                                                      MetricsHistory({})))
    entries = {s.site: s for s in state.history.rounds[0].sites}
    assert entries["honest"].error is None
    error = entries["everything"].error
    assert error is not None and "has unknown" in error
    for name in head:
        np.testing.assert_array_equal(state.weights[name], start[name] + 1)
