"""Public starting models: phantom families, the planned architecture, a usable checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from benchmarks.pretrain import PRESETS, main, model_spec
from fedseg.cli import main as cli_main
from server.app import initial_weights
from server.config import RunConfig
from server.history import MetricsHistory
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec
from shared.networks import build_network
from shared.planning import make_plan
from shared.settings import AUTO
from shared.trainable import trainable_names
from simulations.phantom_families import (
    FAMILIES,
    LUNG_SIDE,
    VESSEL_SIDE,
    lung_phantom,
    vessel_phantom,
    write_family_site,
)
from simulations.phantoms import write_synthetic_federation
from simulations.pretrain import MODEL_KEYS, public_start
from simulations.simulate import SimulationRequest, run_simulation
from simulations.sites import plan_sites
from simulations.starting import (
    DEFAULTS,
    PROFILES,
    choose_family,
    starting_model,
)
from tests.test_planning import _fp


def _model_keys(plan_keys: dict[str, object], family: str) -> dict[str, object]:
    return {k: plan_keys[k] for k in PRESETS[family]}


def test_presets_are_the_planners_choice_for_the_real_data() -> None:
    # Fingerprints like chest-xray's and retina's (fedseg plan --data ../shared/data/...).
    chest = make_plan([_fp(num_cases=94), _fp(num_cases=358, dark_fraction=0.06)])
    assert _model_keys(chest.to_run_config(), "lung") == PRESETS["lung"]
    retina = make_plan([_fp(num_cases=20, channels=3, shape=(584, 568), thickness=7.7,
                            dark_fraction=0.19)])
    assert _model_keys(retina.to_run_config(), "vessel") == PRESETS["vessel"]


def test_vessel_phantoms_look_like_retina_to_the_planner(tmp_path: Path) -> None:
    folder = write_family_site(tmp_path, "vessel", 4, seed=1)
    plan = plan_sites([folder]).to_run_config()
    assert _model_keys(plan, "vessel") == PRESETS["vessel"]


def test_lung_phantoms_are_two_lung_fields_darker_than_the_thorax() -> None:
    for case in range(4):
        image, label = lung_phantom(np.random.default_rng([0, case]))
        assert image.shape == label.shape == (LUNG_SIDE, LUNG_SIDE)
        assert image.dtype == np.float32 and image.min() >= 0.0 and image.max() <= 1.0
        regions, count = ndimage.label(label)
        sizes = np.bincount(regions.ravel())[1:]
        assert count == 2 and sizes.min() > 0.05 * label.size
        # The two fields lie left and right of the midline.
        centres = sorted(ndimage.center_of_mass(label, regions, [1, 2]), key=lambda c: c[1])
        assert centres[0][1] < LUNG_SIDE / 2 < centres[1][1]
        around = ndimage.binary_dilation(label, iterations=12) & ~label.astype(bool)
        assert image[label == 1].mean() < image[around].mean() - 0.1
    again, _ = lung_phantom(np.random.default_rng([0, 3]))
    np.testing.assert_array_equal(again, image)


def test_vessel_phantoms_are_thin_trees_in_a_dark_frame() -> None:
    image, label = vessel_phantom(np.random.default_rng([0, 0]))
    assert image.shape == (VESSEL_SIDE, VESSEL_SIDE, 3) and label.shape == image.shape[:2]
    assert image[:8, :8].mean() < 0.1 and label[:8, :8].max() == 0  # the dark frame
    fov = image.mean(axis=-1) > 0.03
    assert 0.03 < label[fov].mean() < 0.15
    # Thin: the widest vessel is a few pixels, most are one or two.
    depth = ndimage.distance_transform_edt(label)
    assert depth.max() <= 8.0 and np.median(depth[label == 1]) <= 1.5
    # Darker than the fundus around them, relatively most in green.
    near = ndimage.binary_dilation(label, iterations=3) & ~label.astype(bool) & fov
    vessel, background = image[label == 1].mean(axis=0), image[near].mean(axis=0)
    assert np.all(vessel < background) and np.argmax(1 - vessel / background) == 1


def test_pretraining_writes_a_checkpoint_the_run_can_start_from(tmp_path: Path) -> None:
    out = tmp_path / "lung.pt"
    small = "channels='8,16' resize='64,64' patch-size='64,64'"
    assert main(["--family", "lung", "--out", str(out), "--cases", "4", "--steps", "2",
                 "--batch", "2", "--run-config", small]) == 0
    record = json.loads((tmp_path / "lung.pt.json").read_text())
    assert record["family"] == "lung" and record["steps"] == 4  # 4 chunks of one step
    assert "no real image, label or statistic" in record["saw"]
    saved = Checkpoint.load(out)
    assert saved.spec == model_spec("lung", {"channels": "8,16", "resize": "64,64",
                                             "patch-size": "64,64"})
    run = RunConfig.from_user_config({**PRESETS["lung"], "channels": "8,16", "resize": "64,64",
                                      "patch-size": "64,64", "initial-model": str(out)})
    start = initial_weights(run)
    assert set(start) == set(saved.weights)
    for name, value in saved.weights.items():
        np.testing.assert_array_equal(start[name], value)
    assert set(FAMILIES) == set(PRESETS)


def test_only_grey_2d_sites_with_thick_structures_fit_the_lung_profile() -> None:
    lung = PROFILES["lung"]
    assert lung.fits(_fp(thickness=32.0)) and lung.fits(_fp(thickness=100.0))
    assert not lung.fits(_fp(thickness=31.9))
    assert not lung.fits(_fp(channels=3))
    assert not lung.fits(_fp(spatial_dims=3, shape=(128, 128, 64), spacing=(1.0, 1.0, 1.0)))
    # The combined fingerprint decides: a chest-like federation, a retina-like one.
    assert choose_family([_fp(num_cases=94, dp_patients=94), _fp(num_cases=358)]) == "lung"
    assert choose_family([_fp(channels=3, thickness=7.7, dark_fraction=0.3)]) == "vessel"
    # Lung-like images whose labels code two structures: the phantoms have one foreground.
    assert choose_family([_fp(num_cases=94, dp_patients=94, classes=3)]) is None
    assert set(PROFILES) <= set(FAMILIES)


def test_only_colour_2d_sites_with_thin_structures_fit_the_vessel_profile() -> None:
    vessel = PROFILES["vessel"]
    assert vessel.fits(_fp(channels=3, thickness=1.0)) and vessel.fits(_fp(channels=3,
                                                                           thickness=16.0))
    assert not vessel.fits(_fp(channels=3, thickness=16.1))
    assert not vessel.fits(_fp(channels=1, thickness=7.7))
    assert not vessel.fits(_fp(channels=3, thickness=7.7, classes=3))
    # Colour images of mid-sized structures fit neither family.
    assert choose_family([_fp(channels=3, thickness=20.0)]) is None


def test_no_fitting_family_leaves_the_run_config_and_says_so(tmp_path: Path) -> None:
    said: list[str] = []
    values = {"num-server-rounds": 2}
    assert public_start([_fp(channels=3, thickness=20.0)], values, tmp_path,
                        said.append) == values
    assert "random weights" in said[0] and not list(tmp_path.iterdir())


def test_fedseg_plan_says_what_a_dp_simulation_starts_from(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lung = [_fp(num_cases=94, dp_patients=94), _fp(num_cases=358)]
    budget = DEFAULTS["lung"]
    assert starting_model(lung) == (
        f"fedseg simulate starts DP-SGD from the planned network pretrained on "
        f"{budget['cases']} public 'lung' phantoms ({budget['steps']} steps), with "
        "dp-trainable='decoder' unless the run config names initial-model")
    retina = [_fp(channels=3, thickness=7.7, dp_patients=9)]
    budget = DEFAULTS["vessel"]
    assert starting_model(retina) == (
        "fedseg simulate starts DP-SGD from the network planned without DP-SGD (channels "
        f"'16,32,64,128') pretrained on "
        f"{budget['cases']} public 'vessel' phantoms ({budget['steps']} steps), with "
        "dp-trainable='norm+adapter' adaptation='adapter' dp-learning-rate=0.01 unless the run "
        "config names initial-model")
    assert "random weights" in starting_model([_fp(channels=3, thickness=20.0)])
    # The line is printed only when the sites train under DP-SGD.
    data = tmp_path / "data"
    write_synthetic_federation(data, num_sites=1, cases_per_site=4, shape=(16, 16))
    site_toml = tmp_path / "site.toml"
    site_toml.write_text("dp-enabled = true\ndp-target-epsilon = 8\ndp-max-epsilon = 8\n")
    assert cli_main(["plan", "--data", str(data)]) == 0
    assert "DP-SGD" not in capsys.readouterr().out
    assert cli_main(["plan", "--data", str(data), "--site-config", str(site_toml)]) == 0
    out = capsys.readouterr().out
    assert sum("DP-SGD trains every parameter" in line for line in out.splitlines()) == 1


def test_a_planned_dp_simulation_starts_from_public_phantoms_and_trains_the_decoder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two grey sites of lung-field phantoms stand in for the chest X-ray sites.
    data = tmp_path / "sites"
    data.mkdir()
    for name in ("a", "b"):
        write_family_site(tmp_path / "drawn" / name, "lung", 6, seed=ord(name)).rename(data / name)
    monkeypatch.setitem(DEFAULTS, "lung", {"cases": 4, "steps": 1, "batch": 2})
    dp = {"dp-enabled": True, "dp-target-epsilon": 8.0, "dp-max-epsilon": 8.0, "dp-delta": 1e-5}
    outcome = run_simulation(SimulationRequest(
        data=data, output=tmp_path / "runs", site_settings=dp,
        overrides={"num-server-rounds": 1, "local-steps": 1}), echo=lambda _: None)
    start = outcome.run_dir / "starting-model.pt"
    record = json.loads(start.with_name("starting-model.pt.json").read_text())
    assert record["family"] == "lung" and "no real image" in record["saw"]
    config = MetricsHistory.read(outcome.metrics_json).run_config
    assert config["initial_model"] == str(start) and config["dp_trainable"] == "decoder"
    # Outside the decoder, the final model is the public one, bit for bit.
    first, final = Checkpoint.load(start), Checkpoint.load(outcome.final_model)
    spec = final.spec
    net = build_network(spec)
    decoder = trainable_names(net, spec.network, "decoder")
    assert first.spec == spec and decoder
    for name, value in first.weights.items():
        if name not in decoder:
            np.testing.assert_array_equal(final.weights[name], value)
    assert any(not np.array_equal(final.weights[n], first.weights[n]) for n in decoder)


def test_a_planned_dp_simulation_of_vessel_sites_takes_the_vessel_recipe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretraining itself is the lung test's; here only what the run is told to do.
    calls: list[tuple[str, ModelSpec]] = []

    def fake_pretrain(family: str, spec: ModelSpec, *args: object,
                      **kwargs: object) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        calls.append((family, spec))
        return {"family": family, "saw": "no real image"}, initial_weights(
            RunConfig.from_user_config({**PRESETS["vessel"], "seed": 3}))

    monkeypatch.setattr("simulations.pretrain.pretrain", fake_pretrain)
    private = [_fp(channels=3, shape=(576, 576), thickness=7.7, dark_fraction=0.3,
                   dp_patients=4)] * 2
    # A simulation leaves the planned keys `auto`; the run's own values stay.
    values = public_start(private, {"num-server-rounds": 1, "adaptation": "none",
                                    "channels": AUTO, "patch-size": AUTO},
                          tmp_path, lambda _: None)
    # Pretrained as the private plan's model (no fine-tune under DP-SGD), on the wide network.
    (family, spec), = calls
    assert family == "vessel" and spec.channels == (16, 32, 64, 128)
    assert spec.personalization == "none" and spec.adaptation == "none"
    # The recipe, under what the run set itself; the network planned without DP-SGD.
    public = make_plan([_fp(channels=3, shape=(576, 576), thickness=7.7,
                            dark_fraction=0.3)] * 2).to_run_config()
    assert make_plan(private).to_run_config()["channels"] != public["channels"]
    assert values == {"dp-trainable": "norm+adapter", "adaptation": "none",
                      "dp-learning-rate": 0.01, **{k: public[k] for k in MODEL_KEYS},
                      "num-server-rounds": 1,
                      "initial-model": str(tmp_path / "starting-model.pt")}
    assert Checkpoint.load(tmp_path / "starting-model.pt").spec.channels == (16, 32, 64, 128)
    # A network the run config names is the one pretrained and trained.
    values = public_start(private, {"channels": "8,16"}, tmp_path, lambda _: None)
    assert values["channels"] == "8,16" and calls[-1][1].channels == (8, 16)


def test_a_dp_simulation_of_vessel_phantom_sites_runs_the_vessel_recipe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Colour sites of thin vessel phantoms stand in for the retina sites; the
    # simulation leaves the planned keys `auto`, as `fedseg simulate` does.
    data = tmp_path / "sites"
    data.mkdir()
    for name in ("a", "b"):
        write_family_site(tmp_path / "drawn" / name, "vessel", 4,
                          seed=ord(name)).rename(data / name)
    monkeypatch.setitem(DEFAULTS, "vessel", {"cases": 2, "steps": 1, "batch": 2})
    dp = {"dp-enabled": True, "dp-target-epsilon": 8.0, "dp-max-epsilon": 8.0, "dp-delta": 1e-5}
    outcome = run_simulation(SimulationRequest(
        data=data, output=tmp_path / "runs", site_settings=dp,
        overrides={"num-server-rounds": 1, "local-steps": 1, "batch-size": 2}),
        echo=lambda _: None)
    config = MetricsHistory.read(outcome.metrics_json).run_config
    assert (config["dp_trainable"], config["dp_learning_rate"]) == ("norm+adapter", 0.01)
    assert config["model"]["model-adaptation"] == "adapter"
    # The network planned without DP-SGD, not the private plan's smaller one.
    assert config["model"]["model-channels"] == PRESETS["vessel"]["channels"]
    start = Checkpoint.load(outcome.run_dir / "starting-model.pt")
    assert start.spec.channels == Checkpoint.load(outcome.final_model).spec.channels
