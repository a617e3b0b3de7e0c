"""Integration tests on the real data sets beside the repository (skipped without them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.data_contract import discover_cases, load_case, split_cases
from fedseg.cli import main
from server.history import MetricsHistory
from simulations.simulate import SimulationRequest, run_simulation
from simulations.sites import find_site_folders
from tests.conftest import real_data

pytestmark = pytest.mark.realdata


def test_every_retina_case_passes_the_data_contract() -> None:
    root = real_data("retina")
    counts = {}
    for site in find_site_folders(root):
        refs = discover_cases(site)
        train, val = split_cases(refs, 0.2)
        assert not {r.patient_id for r in train} & {r.patient_id for r in val}
        for ref in refs:
            case = load_case(ref, in_channels=3, num_classes=2, spatial_dims=2)
            assert case.image.shape[0] == 3 and case.label.shape == case.image.shape[1:]
            assert set(case.label.ravel().tolist()) <= {0, 1}
        counts[site.name] = len(refs)
    assert counts == {"CHASEDB1": 22, "DRIVE": 32, "STARE": 16}
    chase = {r.patient_id for r in discover_cases(root / "CHASEDB1")}
    assert len(chase) == 11  # two eyes per child, one patient each


def test_la_mri_volumes_load_as_3d_nifti() -> None:
    site = real_data("la-mri")
    refs = discover_cases(site)
    assert len(refs) == 24
    case = load_case(refs[0], in_channels=1, num_classes=2, spatial_dims=3)
    assert case.image.ndim == 4 and case.image.shape[1:] == case.label.shape
    assert case.source.spacing == pytest.approx((0.625, 0.625, 0.625))


def test_plans_for_radiographs_and_mri_volumes_differ_as_their_data(
        capsys: pytest.CaptureFixture[str]) -> None:
    # Lungs on radiographs: whole images at 256 px. The left atrium in MRI (26 voxels
    # thick at 0.625 mm): each volume halved on every axis, in patches.
    assert main(["plan", "--data", str(real_data("chest-xray"))]) == 0
    chest = capsys.readouterr().out
    assert "resize = '256,256'" in chest and "downsample = 'none'" in chest
    assert "patch-size = '256,256'" in chest
    assert main(["plan", "--data", str(real_data("la-mri"))]) == 0
    atrium = capsys.readouterr().out
    assert "resize = 'none'" in atrium and "downsample = '2,2,2'" in atrium
    assert "patch-size = '56,64,40'" in atrium and "batch-size = 2" in atrium


def test_retina_federation_through_flower(tmp_path: Path) -> None:
    outcome = run_simulation(
        SimulationRequest(data=real_data("retina"), output=tmp_path,
                          # The plan's 750-step fine-tune would be most of the run.
                          overrides={"num-server-rounds": 1, "local-steps": 3,
                                     "finetune-steps": 3, "channels": "8,16,32,64"}),
        echo=lambda line: None)
    (rnd,) = MetricsHistory.read(outcome.metrics_json).rounds
    assert rnd.aggregated
    assert [s.site for s in rnd.sites] == ["CHASEDB1", "DRIVE", "STARE"]
    assert all(s.val_dice is not None and s.error is None for s in rnd.sites)
    assert outcome.final_model.is_file()
