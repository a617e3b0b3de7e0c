"""Site-local domain-adaptation layers: chosen by module type, kept at the site."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from torch import nn

from client.app import make_client_app
from client.config import SiteConfig
from client.site_state import FILE_NAME
from client.trainer import SiteTrainer
from server.config import RunConfig
from server.federation import FederationState, run_round
from server.history import MetricsHistory
from server.strategies import build_strategy
from shared.networks import build_network
from shared.partition import LOCAL_NORM_TYPES, InputAdapter, local_parameter_names
from shared.weights import state_to_numpy
from simulations.phantoms import write_synthetic_federation
from tests.conftest import FakeGrid


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapt-sites")
    return write_synthetic_federation(root, num_sites=2, cases_per_site=6, shape=(32, 32))


def run_config(mode: str) -> RunConfig:
    return RunConfig.from_user_config({
        "min-available-nodes": 2, "min-train-nodes": 2, "min-evaluate-nodes": 2,
        "local-steps": 2, "batch-size": 2, "channels": "8,16", "patch-size": "16,16",
        "adaptation": mode})


def test_registry_selects_by_module_type_not_name() -> None:
    class Tricky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.Conv2d(1, 1, 1)          # named like a norm, is not one
            self.body = nn.InstanceNorm2d(1, affine=True)  # is one, named otherwise
            self.adapter_like = nn.Conv2d(1, 1, 1)

    assert local_parameter_names(Tricky(), "local-norm") == {"body.weight", "body.bias"}
    assert local_parameter_names(Tricky(), "none") == frozenset()
    assert local_parameter_names(Tricky(), "adapter") == frozenset()


@pytest.mark.parametrize("mode", ["none", "local-norm", "adapter", "adapter+local-norm"])
def test_messages_hold_exactly_the_shared_parameters(mode: str, sites: list[Path],
                                                     tmp_path: Path) -> None:
    cfg = run_config(mode)
    net = build_network(cfg.model)
    # Expected split, derived independently from module types.
    local_modules = [m for m in net.modules()
                     if ("norm" in mode and isinstance(m, LOCAL_NORM_TYPES))
                     or ("adapter" in mode and isinstance(m, InputAdapter))]
    local_ids = {id(t) for m in local_modules for t in m.parameters()}
    expected = [n for n, t in net.named_parameters() if id(t) not in local_ids]
    buffers = {n for n, _ in net.named_buffers()}
    if mode != "none":
        assert local_ids

    site_cfgs = {n: SiteConfig(data_path=d, state_dir=tmp_path / d.name, device="cpu",
                               num_threads=1, val_fraction=0.34)
                 for n, d in zip((1, 2), sites, strict=True)}
    app = make_client_app(lambda ctx: site_cfgs[ctx.node_id])
    sent_by_sites: list[Message] = []

    def responder(node: int):  # type: ignore[no-untyped-def]
        ctx = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})

        def respond(msg: Message) -> Message:
            reply = app(msg, ctx)
            sent_by_sites.append(reply)
            return reply
        return respond

    grid = FakeGrid({n: responder(n) for n in site_cfgs})
    from server.app import initial_weights

    state = FederationState(0, initial_weights(cfg), MetricsHistory({}))
    assert list(state.weights) == expected  # the server never even holds local layers
    for _ in range(2):
        state = run_round(grid, build_strategy(cfg), cfg, state)
    assert len(sent_by_sites) == 8 and not any(m.has_error() for m in sent_by_sites)
    forbidden = [str(d) for d in sites] + [".png", ".nii", "imagesTr", "labelsTr"]
    for msg in sent_by_sites:
        content = msg.content
        for record in content.array_records.values():
            assert list(record.keys()) == expected
            assert not set(record.keys()) & buffers
        for record in content.metric_records.values():
            assert all(isinstance(v, int | float) for v in record.values())
        for record in content.config_records.values():
            for value in record.values():
                assert not any(f in str(value) for f in forbidden), value
        if msg.metadata.message_type == "evaluate":
            assert not content.array_records


def test_local_layers_persist_across_restart_and_differ_between_sites(
        sites: list[Path], tmp_path: Path) -> None:
    cfg = run_config("adapter+local-norm")
    trainers = [SiteTrainer(SiteConfig(data_path=d, state_dir=tmp_path / d.name, device="cpu",
                                       num_threads=1, val_fraction=0.34), cfg.model)
                for d in sites]
    fresh = trainers[0].local_weights()
    start = trainers[0].weights()
    for t in trainers:
        t.train(start, cfg.plan(1))
    a, b = (t.local_weights() for t in trainers)
    assert all((tmp_path / d.name / FILE_NAME).is_file() for d in sites)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], fresh[k]) for k in a)
    # A restarted site (new trainer, same state folder) resumes its own layers.
    restarted = SiteTrainer(trainers[0].site, cfg.model)
    for k, v in restarted.local_weights().items():
        np.testing.assert_array_equal(v, a[k])
    # The adapter starts as the identity, so a fresh adapted network equals the plain one.
    adapter = InputAdapter(3, 2)
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(adapter(x), x)
    assert set(state_to_numpy(build_network(cfg.model).state_dict())) >= set(a)
