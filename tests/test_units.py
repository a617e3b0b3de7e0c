"""Exact-value and bad-input tests of the pure building blocks in shared/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client.config import SiteConfig
from client.proximal import proximal_term
from server.config import RunConfig
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec, TrainPlan
from shared.errors import ConfigError, DataError
from shared.metrics import case_dice, dice_per_class, weighted_mean
from shared.networks import assert_no_batchnorm, build_network
from shared.weights import check_compatible, from_record, state_to_numpy, to_record


def test_dice_exact_values() -> None:
    pred = np.array([[1, 1, 0], [0, 2, 2]])
    target = np.array([[1, 0, 0], [0, 2, 0]])
    # class 1: |P|=2 |T|=1 overlap 1 -> 2/3; class 2: |P|=2 |T|=1 overlap 1 -> 2/3
    np.testing.assert_allclose(dice_per_class(pred, target, 3), [2 / 3, 2 / 3])
    assert case_dice(np.zeros((2, 2), int), np.zeros((2, 2), int), 2) == 1.0
    assert case_dice(np.ones((2, 2), int), np.zeros((2, 2), int), 2) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(np.zeros((2, 2)), np.zeros((2, 3)), 2)


def test_weighted_mean() -> None:
    assert weighted_mean([0.5, 0.9], [1, 3]) == pytest.approx(0.8)
    assert np.isnan(weighted_mean([0.5], [0]))


def test_proximal_term_exact() -> None:
    w = torch.tensor([1.0, 2.0])
    anchor = {"w": torch.tensor([0.0, 0.0]), "unused": torch.ones(1)}
    assert proximal_term([("w", w), ("local", torch.ones(3))], anchor).item() == 5.0


@pytest.mark.parametrize("network,channels,patch", [
    ("unet", "8,16,32", "32,32"),
    ("unet", "8,16,32", "16,16,16"),
    ("basicunet", "8,8,16,16,32,8", "32,32"),
    ("segresnet", "8", "16,16,16"),
])
@pytest.mark.parametrize("norm", ["instance", "group"])
def test_networks_map_patch_to_class_logits_without_batchnorm(
        network: str, channels: str, patch: str, norm: str) -> None:
    spec = RunConfig.from_user_config({"network": network, "channels": channels,
                                       "patch-size": patch, "norm": norm,
                                       "in-channels": 3, "num-classes": 3}).model
    net = build_network(spec)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    out = net(torch.zeros(2, 3, *spec.patch_size))
    assert tuple(out.shape) == (2, 3, *spec.patch_size)


def test_assert_no_batchnorm_rejects_batchnorm() -> None:
    with pytest.raises(ValueError, match="BatchNorm2d"):
        assert_no_batchnorm(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)))


def test_weights_round_trip_and_mismatch() -> None:
    spec = ModelSpec(channels=(8, 16), patch_size=(16, 16))
    state = build_network(spec).state_dict()
    arrays = state_to_numpy(state)
    back = from_record(to_record(arrays))
    assert list(back) == list(arrays)
    for name in arrays:
        np.testing.assert_array_equal(back[name], arrays[name])
    check_compatible(state, back, "test")
    bad = dict(back)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        check_compatible(state, bad, "weights from the server")
    wrong = {k: (v if i else np.zeros((1,))) for i, (k, v) in enumerate(back.items())}
    with pytest.raises(ValueError, match="shape"):
        check_compatible(state, wrong, "weights from the server")


def test_checkpoint_round_trip_and_bad_file(tmp_path: Path) -> None:
    spec = ModelSpec(channels=(8, 16), patch_size=(16, 16))
    weights = state_to_numpy(build_network(spec).state_dict())
    Checkpoint(spec, weights, 4).save(tmp_path / "m.pt")
    back = Checkpoint.load(tmp_path / "m.pt")
    assert back.spec == spec and back.server_round == 4
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"junk\.pt"):
        Checkpoint.load(tmp_path / "junk.pt")
    with pytest.raises(DataError, match="not found"):
        Checkpoint.load(tmp_path / "missing.pt")


def test_run_config_defaults_match_pyproject() -> None:
    import tomllib

    from tests.conftest import REPO

    defaults = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_user_config(defaults) == RunConfig()


@pytest.mark.parametrize("values,key", [
    ({"strategy": "fedsgd"}, "strategy"),
    ({"num-server-rounds": 0}, "num-server-rounds"),
    ({"learning-rate": -1.0}, "learning-rate"),
    ({"patch-size": "60,60"}, "patch-size"),
    ({"patch-size": "64"}, "patch-size"),
    ({"channels": "a,b"}, "channels"),
    ({"norm": "batch"}, "norm"),
    ({"min-available-nodes": 1, "min-train-nodes": 3}, "min-available-nodes"),
    ({"num-rounds": 3}, "num-rounds"),
])
def test_run_config_rejects_bad_values_naming_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_user_config(values)
    assert f"'{key}'" in str(info.value)
    assert "\n" not in str(info.value)


def test_site_config_parsing_and_errors(tmp_path: Path) -> None:
    site = SiteConfig.from_node_config({"data-path": str(tmp_path / "DRIVE"), "device": "CPU"})
    assert site.site_name == "DRIVE" and site.device == "cpu"
    assert site.state_dir == Path("fedseg-state") / "DRIVE"
    for values, key in [({}, "data-path"),
                        ({"data-path": "x", "device": "tpu"}, "device"),
                        ({"data-path": "x", "val-fraction": 1.0}, "val-fraction"),
                        ({"data-path": "x", "patient-pattern": "no_group"}, "patient-pattern"),
                        ({"data-path": "x", "patient-pattern": "("}, "patient-pattern")]:
        with pytest.raises(ConfigError, match=f"'{key}'"):
            SiteConfig.from_node_config(values)


def test_train_plan_round_trip_through_config() -> None:
    cfg = RunConfig.from_user_config({"strategy": "fedprox", "proximal-mu": 0.5,
                                      "local-steps": 3})
    plan = cfg.plan(4)
    assert plan.proximal_mu == 0.5 and plan.server_round == 4
    assert TrainPlan.from_config(plan.to_config()) == plan
    assert ModelSpec.from_config(cfg.model.to_config()) == cfg.model
    assert RunConfig.from_user_config({"strategy": "fedavg", "proximal-mu": 0.5}).plan(1) \
        .proximal_mu == 0.0
