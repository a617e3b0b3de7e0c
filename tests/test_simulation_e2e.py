"""End-to-end federated runs through Flower's simulation engine (about 30 s each)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.data_contract import discover_cases, load_case
from client.personal import FILE_NAME as PERSONAL_FILE
from client.predict import load_site_network
from server.history import MetricsHistory
from shared.checkpoint import Checkpoint
from shared.run_files import RunFiles
from simulations.simulate import SimulationRequest, run_simulation

pytestmark = pytest.mark.e2e


def test_2d_federation_learns_and_writes_everything(tmp_path: Path) -> None:
    lines: list[str] = []
    outcome = run_simulation(
        SimulationRequest(num_sites=3, cases_per_site=10, synthetic_size=64, output=tmp_path,
                          overrides={"num-server-rounds": 3, "local-steps": 12,
                                     "channels": "8,16,32,64"}),
        echo=lines.append,
    )
    history = MetricsHistory.read(outcome.metrics_json)
    assert [r.round for r in history.rounds] == [1, 2, 3]
    for rnd in history.rounds:
        assert [s.site for s in rnd.sites] == ["site-a", "site-b", "site-c"]
        assert all(s.error is None and s.num_train_cases == 8 for s in rnd.sites)
        assert rnd.aggregated
    final = history.rounds[-1]
    assert final.mean_val_dice is not None and final.mean_val_dice > 0.6
    assert any(line.startswith("round 3/3") for line in lines)
    assert outcome.metrics_csv.read_text().count("\n") == 1 + 3 * 3
    model = Checkpoint.load(outcome.final_model)
    assert model.server_round == 3 and model.spec.spatial_dims == 2
    assert sorted(p.name for p in (outcome.run_dir / "checkpoints").iterdir()) == [
        "round-001.pt", "round-002.pt", "round-003.pt"]


def test_3d_federation_on_nifti_volumes(tmp_path: Path) -> None:
    outcome = run_simulation(
        SimulationRequest(num_sites=2, cases_per_site=5, synthetic_dims=3, synthetic_size=32,
                          output=tmp_path,
                          overrides={"num-server-rounds": 1, "local-steps": 3,
                                     "patch-size": "32,32,32", "channels": "8,16,32"}),
        echo=lambda line: None,
    )
    # The sites were NIfTI volumes on disk, read back through the data contract.
    site = outcome.run_dir / "synthetic-data" / "site-a"
    refs = discover_cases(site)
    assert refs and all(r.image.name.endswith(".nii.gz") for r in refs)
    assert nib.load(refs[0].image).shape == (32, 32, 32)
    case = load_case(refs[0], in_channels=1, num_classes=2, spatial_dims=3)
    assert case.image.shape == (1, 32, 32, 32) and set(np.unique(case.label)) <= {0, 1}

    history = MetricsHistory.read(outcome.metrics_json)
    (rnd,) = history.rounds
    assert rnd.aggregated and len(rnd.sites) == 2
    assert all(s.val_dice is not None and s.train_steps == 3 for s in rnd.sites)
    model = Checkpoint.load(outcome.final_model)
    assert model.spec.spatial_dims == 3
    assert any(w.ndim == 5 for w in model.weights.values())  # 3D convolution kernels


def test_finetune_federation_deploys_each_sites_fine_tune(tmp_path: Path) -> None:
    outcome = run_simulation(
        SimulationRequest(num_sites=2, cases_per_site=6, synthetic_size=32, output=tmp_path,
                          overrides={"num-server-rounds": 2, "local-steps": 2,
                                     "channels": "8,16", "patch-size": "32,32",
                                     "personalization": "finetune", "finetune-steps": 2}),
        echo=lambda line: None,
    )
    history = MetricsHistory.read(outcome.metrics_json)
    assert all(s.val_dice is not None and s.train_steps == 2
               for r in history.rounds for s in r.sites)
    cross = json.loads(RunFiles(outcome.run_dir).cross_site_json.read_text())
    assert cross["models"] == ["site-a deployed", "site-b deployed"]
    for name in ("site-a", "site-b"):
        # The site's last fine-tune is of the final model: fedseg predict deploys it.
        state = outcome.run_dir / "site-state" / name
        site_net = load_site_network(outcome.final_model, state)
        assert site_net.personal and (state / PERSONAL_FILE).is_file()
