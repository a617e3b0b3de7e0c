"""A site's failure reaches the server as a code and a generic reason, never a path."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from client.app import make_client_app
from client.config import SiteConfig
from client.data_contract import discover_cases
from server.config import RunConfig
from server.federation import FederationState, RunFolder, run_round
from server.history import MetricsHistory
from server.strategies import build_strategy
from shared import protocol as p
from simulations.phantoms import write_synthetic_federation
from tests.conftest import FakeGrid


def test_no_path_or_case_name_from_a_site_error_reaches_the_history(tmp_path: Path) -> None:
    folder = write_synthetic_federation(tmp_path / "data", num_sites=1, cases_per_site=4,
                                        shape=(32, 32))[0]
    victim = discover_cases(folder)[0]
    patient = victim.image.with_name("doe_jane_1961" + victim.image.suffix)
    victim.image.rename(patient)
    victim.label.rename(victim.label.with_name(patient.name))
    patient.write_bytes(b"not an image")           # the site's DataError names this file
    site = SiteConfig(data_path=folder, site_name="site-a", state_dir=tmp_path / "state",
                      device="cpu", num_threads=1)
    app = make_client_app(lambda ctx: site)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    replies: list[Message] = []

    def respond(msg: Message) -> Message:
        replies.append(app(msg, context))
        return replies[-1]

    config = RunConfig.from_user_config({"channels": "8,16", "patch-size": "32,32",
                                         "local-steps": 1, "num-server-rounds": 1})
    from server.app import initial_weights

    state = FederationState(0, initial_weights(config), MetricsHistory({}))
    state = run_round(FakeGrid({1: respond}), build_strategy(config), config, state)
    RunFolder(tmp_path / "run").save_round(state, config)

    assert replies and all(r.has_error() for r in replies)
    assert {r.error.code for r in replies} == {p.ERROR_DATA}
    history = (tmp_path / "run" / "metrics.json").read_text()
    entry = json.loads(history)["rounds"][0]["sites"][0]
    assert "data cannot be used" in entry["error"] and "site's own log" in entry["error"]
    for secret in ("doe_jane", str(folder), str(tmp_path), "imagesTr", ".png"):
        assert secret not in history
        assert all(secret not in (r.error.reason or "") for r in replies)
