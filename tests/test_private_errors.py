"""A site's failure reaches the server as a code and a generic reason, never a path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.app import make_client_app
from client.config import SiteConfig
from client.data_contract import discover_cases
from client.trainer import SiteTrainer
from server.config import RunConfig
from server.federation import FederationState, NotEnoughSitesError, RunFolder, run_round
from server.history import MetricsHistory
from server.strategies import build_strategy
from shared import protocol as p
from simulations.phantoms import write_synthetic_federation
from tests.conftest import FakeGrid

pytestmark = pytest.mark.faults


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
                                         "local-steps": 1, "num-server-rounds": 1,
                                         "round-retries": 0})
    from server.app import initial_weights

    state = FederationState(0, initial_weights(config), MetricsHistory({}))
    # Its only site failed, so the round cannot reach min-train-nodes and the run stops;
    # the failed round's record is what the coordinator keeps.
    with pytest.raises(NotEnoughSitesError) as stopped:
        run_round(FakeGrid({1: respond}), build_strategy(config), config, state)
    state.history.write(RunFolder(tmp_path / "run"))

    assert replies and all(r.has_error() for r in replies)
    assert {r.error.code for r in replies} == {p.ERROR_DATA}
    history = (tmp_path / "run" / "metrics.json").read_text()
    entry = json.loads(history)["rounds"][0]["sites"][0]
    assert "data cannot be used" in entry["error"] and "site's own log" in entry["error"]
    for secret in ("doe_jane", str(folder), str(tmp_path), "imagesTr", ".png"):
        assert secret not in history
        assert secret not in str(stopped.value)
        assert all(secret not in (r.error.reason or "") for r in replies)


@pytest.mark.parametrize("oom", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_in_one_round_is_a_coded_reply_and_the_site_serves_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, oom: type[BaseException]) -> None:
    folders = write_synthetic_federation(tmp_path / "data", num_sites=2, cases_per_site=4,
                                         shape=(32, 32))
    sites = {n: SiteConfig(data_path=f, site_name=f.name, state_dir=tmp_path / "state" / f.name,
                           device="cpu", num_threads=1) for n, f in enumerate(folders, 1)}
    real_train = SiteTrainer.train
    calls: list[str] = []

    def train_or_oom(self: SiteTrainer, *args: object, **kw: object) -> object:
        calls.append(self.site.site_name)
        if self.site.site_name == "site-a" and calls.count("site-a") == 1:
            raise oom(f"CUDA out of memory at {folders[0]}/imagesTr")  # names a path
        return real_train(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(SiteTrainer, "train", train_or_oom)
    app = make_client_app(lambda ctx: sites[ctx.node_id])
    replies: list[Message] = []

    def responder(node: int):  # type: ignore[no-untyped-def]
        context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                          run_config={})

        def respond(msg: Message) -> Message:
            replies.append(app(msg, context))
            return replies[-1]

        return respond

    config = RunConfig.from_user_config({
        "channels": "8,16", "patch-size": "32,32", "local-steps": 1, "num-server-rounds": 2,
        "min-available-nodes": 2, "min-train-nodes": 1, "min-evaluate-nodes": 1,
        "round-retries": 0})
    from server.app import initial_weights

    grid = FakeGrid({1: responder(1), 2: responder(2)})
    state = FederationState(0, initial_weights(config), MetricsHistory({}))
    for _ in range(2):
        state = run_round(grid, build_strategy(config), config, state, grid.clock)
    errors = [r.error for r in replies if r.has_error()]
    assert [(e.code, e.reason) for e in errors] == [(
        p.ERROR_MEMORY, f"the site ran out of memory ({oom.__name__}, code {p.ERROR_MEMORY}); "
        "the details are in the site's own log")]
    first, second = ({s.site: s for s in r.sites} for r in state.history.rounds)
    assert first["site-a"].error is not None and "ran out of memory" in first["site-a"].error
    assert first["site-a"].val_dice is not None      # it still evaluated round 1
    assert first["site-b"].error is None and state.history.rounds[0].aggregated
    # Round 2: site-a trained again and its weights were aggregated with site-b's.
    assert second["site-a"].error is None and second["site-a"].train_loss is not None
    assert state.history.rounds[1].aggregated
    assert calls.count("site-a") == 2
    assert all(np.all(np.isfinite(w)) for w in state.weights.values())
