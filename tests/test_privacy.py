"""Patient-level DP-SGD: accounting, persistence across restarts, refusal, site ownership."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant

from client.accounting import compute_epsilon
from client.app import make_client_app
from client.config import SiteConfig
from client.privacy_ledger import FILE_NAME, PrivacyLedger
from client.trainer import SiteTrainer
from server.config import RunConfig
from server.federation import FederationState, run_round
from server.history import MetricsHistory
from server.strategies import build_strategy
from shared.config import ModelSpec, TrainPlan
from shared.errors import ConfigError, DataError
from shared.networks import build_network
from shared.privacy import (
    PrivacyRequest,
    SitePrivacy,
    gradient_noise_std,
    noise_weights,
    resolve_privacy,
)
from shared.weights import state_to_numpy
from simulations.phantoms import write_synthetic_federation
from tests.conftest import REPO, FakeGrid

SPEC = ModelSpec(channels=(8, 16), patch_size=(16, 16))


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("dp-sites")
    return write_synthetic_federation(root, num_sites=2, cases_per_site=8, shape=(32, 32))


def dp_site(folder: Path, state: Path, **privacy: object) -> SiteConfig:
    return SiteConfig(data_path=folder, state_dir=state, device="cpu", num_threads=1,
                      val_fraction=0.25, privacy=SitePrivacy(enabled=True, **privacy))  # type: ignore[arg-type]


def test_reported_epsilon_matches_opacus_accountant(sites: list[Path], tmp_path: Path) -> None:
    site = dp_site(sites[0], tmp_path, noise_multiplier=1.1, max_grad_norm=1.0)
    trainer = SiteTrainer(site, SPEC)
    privacy = resolve_privacy(site.privacy, PrivacyRequest())
    result = trainer.train(trainer.weights(), TrainPlan(local_steps=4, batch_size=2), privacy)
    # 6 training cases, batch 2 -> Poisson rate 1/3; 4 steps at noise 1.1.
    independent = RDPAccountant()
    for _ in range(4):
        independent.step(noise_multiplier=1.1, sample_rate=1 / 3)
    assert result.steps == 4
    assert result.epsilon == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-12)
    assert result.delta == 1e-5
    # Same check for the PRV accountant on the ledger's own history.
    prv = PRVAccountant()
    for _ in range(4):
        prv.step(noise_multiplier=1.1, sample_rate=1 / 3)
    assert compute_epsilon([(1.1, 1 / 3, 4)], 1e-5, "prv") == pytest.approx(
        prv.get_epsilon(delta=1e-5), rel=1e-6)


def test_dp_and_plain_training_export_identical_names(sites: list[Path], tmp_path: Path) -> None:
    site = dp_site(sites[0], tmp_path, noise_multiplier=1.0)
    trainer = SiteTrainer(site, SPEC)
    start = trainer.weights()
    private = trainer.train(start, TrainPlan(local_steps=2, batch_size=2),
                            resolve_privacy(site.privacy, PrivacyRequest()))
    plain = trainer.train(start, TrainPlan(local_steps=2, batch_size=2))
    assert list(private.weights) == list(plain.weights) == list(start)
    assert all(not n.startswith("_module") for n in private.weights)
    assert any(not np.array_equal(private.weights[k], start[k]) for k in start)


def test_epsilon_survives_site_restarts(sites: list[Path], tmp_path: Path) -> None:
    def round_in_new_process(server_round: int) -> float:
        out = subprocess.run(
            [sys.executable, "-m", "tests.dp_site_round", str(sites[0]), str(tmp_path),
             str(server_round)], cwd=REPO, capture_output=True, text=True, timeout=300,
            check=True)
        return float(json.loads(out.stdout.strip().splitlines()[-1])["epsilon"])

    first = round_in_new_process(1)
    second = round_in_new_process(2)
    assert 0 < first < second
    assert second == pytest.approx(compute_epsilon([(1.1, 1 / 3, 6)], 1e-5, "rdp"), rel=1e-9)
    ledger = PrivacyLedger.load(tmp_path)
    assert [r["round"] for r in ledger.rounds] == [1, 2]


def test_damaged_ledger_is_an_error_not_a_reset(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text("{not json")
    with pytest.raises(DataError, match=FILE_NAME):
        PrivacyLedger.load(tmp_path)


def test_coordinator_cannot_weaken_a_site() -> None:
    site = SitePrivacy(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=3.0)
    weaker = resolve_privacy(site, PrivacyRequest(True, noise_multiplier=0.1, max_grad_norm=5.0))
    assert weaker is not None
    assert (weaker.noise_multiplier, weaker.max_grad_norm, weaker.max_epsilon) == (1.0, 1.0, 3.0)
    stronger = resolve_privacy(site, PrivacyRequest(True, noise_multiplier=2.0,
                                                    max_grad_norm=0.5))
    assert stronger is not None
    assert (stronger.noise_multiplier, stronger.max_grad_norm) == (2.0, 0.5)
    # A request cannot carry a budget: extra keys in the round config are ignored.
    request = PrivacyRequest.from_config({"dp-requested": True, "dp-noise-multiplier": 0.0,
                                          "dp-max-epsilon": 1000.0, "dp-delta": 0.5})
    resolved = resolve_privacy(site, request)
    assert resolved is not None and resolved.max_epsilon == 3.0 and resolved.delta == 1e-5
    # A site without DP still trains privately when the coordinator asks.
    asked = resolve_privacy(SitePrivacy(), PrivacyRequest(True, 0.8, 2.0))
    assert asked is not None and asked.noise_multiplier == 0.8


def test_site_privacy_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="dp-noise-multiplier"):
        SitePrivacy(enabled=True)
    with pytest.raises(ConfigError, match="dp-delta"):
        SitePrivacy(delta=1.0)
    parsed = SiteConfig.from_node_config({"data-path": "x", "dp-enabled": True,
                                          "dp-noise-multiplier": 0.7, "dp-max-epsilon": 8.0})
    assert parsed.privacy.noise_multiplier == 0.7 and parsed.privacy.max_epsilon == 8.0
    assert math.isinf(SiteConfig.from_node_config({"data-path": "x"}).privacy.max_epsilon)


def client_responder(app, site: SiteConfig, node_id: int):  # type: ignore[no-untyped-def]
    context = Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(),
                      run_config={})

    def respond(msg: Message) -> Message:
        return app(msg, context)

    return respond


def test_site_over_budget_refuses_and_federation_goes_on(sites: list[Path],
                                                          tmp_path: Path) -> None:
    a = SiteConfig(data_path=sites[0], state_dir=tmp_path / "a", device="cpu", num_threads=1,
                   val_fraction=0.25)
    b = dp_site(sites[1], tmp_path / "b", noise_multiplier=0.5, max_epsilon=0.01)
    by_node = {1: a, 2: b}
    app = make_client_app(lambda ctx: by_node[ctx.node_id])
    grid = FakeGrid({n: client_responder(app, s, n) for n, s in by_node.items()})
    cfg = RunConfig.from_user_config({
        "min-available-nodes": 2, "min-train-nodes": 1, "min-evaluate-nodes": 1,
        "local-steps": 2, "batch-size": 2, "channels": "8,16", "patch-size": "16,16"})
    start = state_to_numpy(build_network(cfg.model).state_dict())
    state = FederationState(0, start, MetricsHistory({}))
    for _ in range(2):
        state = run_round(grid, build_strategy(cfg), cfg, state)
    for rnd in state.history.rounds:
        entries = {s.site: s for s in rnd.sites}
        assert rnd.aggregated
        assert entries[a.site_name].refused is None and entries[a.site_name].train_loss is not None
        refusal = entries[b.site_name]
        assert refusal.refused is not None and "maximum 0.01" in refusal.refused
        assert refusal.epsilon == 0.0 and refusal.error is None
        assert refusal.val_dice is not None  # it still evaluates the global model
    # The refusing site spent nothing: its ledger never recorded a step.
    assert PrivacyLedger.load(tmp_path / "b").history == []
    assert "refused" in state.history.to_csv().splitlines()[0]


def test_gradient_noise_std_is_the_noise_of_the_mean_gradient() -> None:
    # Opacus: N(0, (1.5 * 2.0)^2) on the sum, divided by the expected 8 patients.
    assert gradient_noise_std(1.5, 2.0, 8.0) == 0.375
    assert gradient_noise_std(0.0, 1.0, 8.0) == 0.0
    with pytest.raises(ValueError, match="expected_units must be above 0, got 0"):
        gradient_noise_std(1.0, 1.0, 0.0)


def test_noise_weights_are_inverse_variances() -> None:
    assert noise_weights([0.5, 0.25]) == [4.0, 16.0]
    # A site without DP-SGD weighs as the least noisy DP-SGD site.
    assert noise_weights([0.5, 0.0, 0.25]) == [4.0, 16.0, 16.0]
    # No DP-SGD site: all alike.
    assert noise_weights([0.0, 0.0]) == [1.0, 1.0]
    assert noise_weights([]) == []
    # Scaling every site's noise leaves the weights' proportions.
    assert noise_weights([2.0, 1.0]) == [0.25, 1.0]


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_noise_weights_refuse_a_bad_standard_deviation(bad: float) -> None:
    with pytest.raises(ValueError, match="must be finite and at least 0"):
        noise_weights([0.5, bad])
