"""Labels that code several structures: planned, trained and scored as several classes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedseg.cli import main as cli_main
from server.history import MetricsHistory
from shared.checkpoint import Checkpoint
from shared.run_files import RunFiles
from simulations.simulate import SimulationRequest, run_simulation


def _three_class_sites(root: Path, sites: int = 2, cases: int = 8, side: int = 32) -> Path:
    """Write sites whose PNG labels hold 0 (background), 1 (a disc) and 2 (a square)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    for s in range(sites):
        images, labels = root / f"site-{s}" / "imagesTr", root / f"site-{s}" / "labelsTr"
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for c in range(cases):
            cy, cx = rng.integers(8, side // 2, size=2)
            label = np.zeros((side, side), dtype=np.uint8)
            label[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 1
            top, left = rng.integers(side // 2, side - 8, size=2)
            label[top:top + 7, left:left + 7] = 2
            image = 40.0 + 80.0 * (label == 1) + 160.0 * (label == 2) \
                + rng.normal(0.0, 8.0, (side, side))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                images / f"case{c:02d}.png")
            Image.fromarray(label).save(labels / f"case{c:02d}.png")
    return root


def test_fedseg_plan_plans_one_output_per_coded_class(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _three_class_sites(tmp_path / "data")
    assert cli_main(["plan", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "labels code 2 structures (values 0 to 2)" in out
    assert "num-classes = 3" in out


def test_fedseg_plan_refuses_sites_whose_labels_code_different_things(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _three_class_sites(tmp_path / "data")
    for path in (data / "site-1" / "labelsTr").iterdir():  # this site: 0/255 masks
        mask = np.asarray(Image.open(path)) > 0
        Image.fromarray((mask * 255).astype(np.uint8)).save(path)
    assert cli_main(["plan", "--data", str(data)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("fedseg: error: 1 site(s) label one foreground (0/255, a soft mask or codes "
                    "with gaps) while others code 3 classes (0 to 2): remap those sites' labels "
                    "to 0..2 (or 0/1), or set num-classes in the run config (2 merges every "
                    "structure into one foreground)")


@pytest.mark.e2e
def test_a_three_class_federation_trains_three_outputs(tmp_path: Path) -> None:
    data = _three_class_sites(tmp_path / "data")
    outcome = run_simulation(
        SimulationRequest(data=data, output=tmp_path / "runs",
                          overrides={"num-server-rounds": 2, "local-steps": 4,
                                     "channels": "8,16", "patch-size": "32,32",
                                     "personalization": "none", "finetune-steps": 0}),
        echo=lambda line: None,
    )
    plan = json.loads(RunFiles(outcome.run_dir).plan_json.read_text())
    assert plan["run-config"]["num-classes"] == 3
    model = Checkpoint.load(outcome.final_model)
    assert model.spec.num_classes == 3
    last_bias = list(model.weights.values())[-1]
    assert last_bias.shape == (3,)  # one output per class
    history = MetricsHistory.read(outcome.metrics_json)
    for site in (s for r in history.rounds for s in r.sites):
        assert site.error is None and site.val_dice is not None
        assert site.val_dice_per_class is not None and len(site.val_dice_per_class) == 2
        assert all(0.0 <= v <= 1.0 for v in site.val_dice_per_class)


def _prostate_like_sites(root: Path, declare: bool, sites: int = 2, cases: int = 6,
                         side: int = 16) -> Path:
    """Write sites of 4D NIfTI images (two MRI sequences on the 4th axis) and 0/1/2 labels."""
    rng = np.random.default_rng(1)
    zz, yy, xx = np.mgrid[:side, :side, :side]
    for s in range(sites):
        site = root / f"site-{s}"
        (site / "imagesTr").mkdir(parents=True)
        (site / "labelsTr").mkdir()
        training = []
        for c in range(cases):
            centre = rng.integers(6, side - 6, size=3)
            distance = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2
                               + (xx - centre[2]) ** 2)
            label = np.where(distance <= 2.5, 2, np.where(distance <= 5.0, 1, 0)).astype(np.uint8)
            sequences = np.stack([100.0 * (label > 0), 80.0 * (label == 2)], axis=-1)
            image = (sequences + rng.normal(0.0, 5.0, sequences.shape)).astype(np.float32)
            nib.save(nib.Nifti1Image(image, np.eye(4)), site / "imagesTr" / f"p{c}.nii.gz")
            nib.save(nib.Nifti1Image(label, np.eye(4)), site / "labelsTr" / f"p{c}.nii.gz")
            training.append({"image": f"./imagesTr/p{c}.nii.gz",
                             "label": f"./labelsTr/p{c}.nii.gz"})
        meta: dict[str, object] = {"training": training,
                                   "labels": {"0": "background", "1": "PZ", "2": "TZ"}}
        if declare:
            meta["modality"] = {"0": "T2", "1": "ADC"}
        (site / "dataset.json").write_text(json.dumps(meta))
    return root


def test_dataset_json_names_the_channels_of_a_4d_series(tmp_path: Path) -> None:
    from client.data_contract import declared_channels

    site = tmp_path / "site"
    site.mkdir()
    assert declared_channels(site) == 0
    for meta, count in [({"modality": {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}}, 4),
                        ({"channel_names": {"0": "T2", "1": "ADC"}}, 2),
                        ({"modality": "MRI"}, 0), ([1, 2], 0), ({"training": []}, 0)]:
        (site / "dataset.json").write_text(json.dumps(meta))
        assert declared_channels(site) == count
    (site / "dataset.json").write_text("{not json")
    assert declared_channels(site) == 0


@pytest.mark.parametrize("declare,channels", [(True, 2), (False, 1)])
def test_a_4d_series_is_planned_as_channels_only_where_declared(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], declare: bool, channels: int) -> None:
    from simulations.sites import probe_layout, site_fingerprints

    data = _prostate_like_sites(tmp_path / "data", declare=declare, sites=1)
    (fingerprint,) = site_fingerprints([data / "site-0"])
    assert (fingerprint.channels, fingerprint.classes) == (channels, 3)
    assert probe_layout(data / "site-0") == (3, channels)


@pytest.mark.e2e
def test_a_decathlon_like_task_of_two_sequences_and_two_structures_needs_no_options(
        tmp_path: Path) -> None:
    data = _prostate_like_sites(tmp_path / "data", declare=True)
    outcome = run_simulation(
        SimulationRequest(data=data, output=tmp_path / "runs",
                          overrides={"num-server-rounds": 2, "local-steps": 3,
                                     "personalization": "none", "finetune-steps": 0}),
        echo=lambda line: None,
    )
    plan = json.loads(RunFiles(outcome.run_dir).plan_json.read_text())["run-config"]
    assert (plan["in-channels"], plan["num-classes"]) == (2, 3)
    model = Checkpoint.load(outcome.final_model)
    assert (model.spec.in_channels, model.spec.num_classes) == (2, 3)
    history = MetricsHistory.read(outcome.metrics_json)
    assert all(s.error is None and s.val_dice_per_class is not None
               for r in history.rounds for s in r.sites)
