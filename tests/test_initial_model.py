"""The run config's initial-model: what is accepted, and one line for what is not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.cli import EXIT_BAD_INPUT, main
from server.app import initial_weights
from server.config import RunConfig
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec
from shared.errors import ConfigError
from shared.networks import build_network
from shared.run_files import FINAL_MODEL, METRICS_JSON

SMALL = {"channels": "8,16", "patch-size": "16,16"}


def config(path: Path | str, **kw: object) -> RunConfig:
    return RunConfig.from_user_config({**SMALL, "initial-model": str(path), **kw})


def refusal(cfg: RunConfig) -> str:
    with pytest.raises(ConfigError) as err:
        initial_weights(cfg)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("run config key 'initial-model': ")
    return text


def seeded_net(spec: ModelSpec, seed: int = 7) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(spec)


def test_a_fedseg_checkpoint_is_round_ones_global_model(tmp_path: Path) -> None:
    cfg = config(tmp_path / "start.pt")
    saved = {k: np.full_like(v, 0.25) for k, v in initial_weights(
        RunConfig.from_user_config(SMALL)).items()}
    Checkpoint(cfg.model, saved, 4).save(tmp_path / "start.pt")
    loaded = initial_weights(cfg)
    assert list(loaded) == list(saved)
    for name, value in saved.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert initial_weights(cfg)["model.0.residual.bias"][0] == 0.25  # independent of seed


def test_a_plain_monai_state_dict_fits_with_or_without_an_adapter(tmp_path: Path) -> None:
    net = seeded_net(RunConfig.from_user_config(SMALL).model)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "nested.pt")
    # The double-precision copy fits too, as float32.
    torch.save({k: v.double() for k, v in net.state_dict().items()}, tmp_path / "f64.pt")
    for name in ("plain.pt", "nested.pt", "f64.pt"):
        loaded = initial_weights(config(tmp_path / name))
        assert set(loaded) == set(net.state_dict())
        for key, value in net.state_dict().items():
            np.testing.assert_array_equal(loaded[key], value.float().numpy())
            assert loaded[key].dtype == np.float32
    adapted = initial_weights(config(tmp_path / "plain.pt", adaptation="adapter"))
    assert set(adapted) == {"backbone." + k for k in net.state_dict()}
    np.testing.assert_array_equal(adapted["backbone.model.0.residual.weight"],
                                  net.state_dict()["model.0.residual.weight"].numpy())
    # Site-local parameters in the file are ignored: the norms stay at the sites.
    local = initial_weights(config(tmp_path / "plain.pt", adaptation="local-norm"))
    assert not any(".adn.N." in k for k in local)


def test_missing_unreadable_and_foreign_files_are_one_line_each(tmp_path: Path) -> None:
    text = refusal(config(tmp_path / "nowhere.pt"))
    assert "nowhere.pt: file not found; pass a fedseg checkpoint" in text
    assert "file not found" in refusal(config(tmp_path / "nowhere.pt"))
    assert "is not a file" in refusal(config(tmp_path))
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    assert "garbage.pt: cannot be read by torch.load(weights_only=True)" in refusal(
        config(tmp_path / "garbage.pt"))
    # A pickled module would run code on load: weights_only refuses it.
    torch.save(build_network(RunConfig.from_user_config(SMALL).model), tmp_path / "module.pt")
    assert "cannot be read by torch.load(weights_only=True)" in refusal(
        config(tmp_path / "module.pt"))
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "other.pt")
    assert "holds neither a fedseg checkpoint nor a state_dict" in refusal(
        config(tmp_path / "other.pt"))


def test_another_architecture_names_the_parameter_and_the_setting(tmp_path: Path) -> None:
    narrow = ModelSpec(channels=(8, 16, 32), patch_size=(16, 16))
    Checkpoint(narrow, {k: v.numpy() for k, v in seeded_net(narrow).state_dict().items()},
               2).save(tmp_path / "three-levels.pt")
    text = refusal(config(tmp_path / "three-levels.pt"))
    assert "does not fit the run's model" in text
    assert "it was saved with channels='8,16,32': set that in the run config" in text
    rgb = ModelSpec(channels=(8, 16), patch_size=(16, 16), in_channels=3)
    torch.save(seeded_net(rgb).state_dict(), tmp_path / "rgb.pt")
    text = refusal(config(tmp_path / "rgb.pt"))
    assert ("'model.0.conv.unit0.conv.weight' has shape (8, 3, 3, 3), the run's model needs "
            "(8, 1, 3, 3)") in text
    assert "in-channels=1" in text


def test_non_finite_weights_are_refused_by_name(tmp_path: Path) -> None:
    state = seeded_net(RunConfig.from_user_config(SMALL).model).state_dict()
    state["model.2.0.conv.bias"][1] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    assert "parameter 'model.2.0.conv.bias' holds NaN or infinite values" in refusal(
        config(tmp_path / "nan.pt"))


def test_simulate_refuses_a_bad_starting_model_before_it_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    code = main(["simulate", "--output", str(out), "--sites", "1", "--cases", "2",
                 "--run-config", f"initial-model='{tmp_path / 'nowhere.pt'}'"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert err.strip().count("\n") == 0 and "nowhere.pt: file not found" in err
    assert not list(out.rglob(FINAL_MODEL)) and not list(out.rglob(METRICS_JSON))
