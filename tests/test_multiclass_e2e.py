"""Labels that code several structures: planned, trained and scored as several classes."""

from __future__ import annotations

import json
from pathlib import Path

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
