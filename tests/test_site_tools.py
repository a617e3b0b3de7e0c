"""``fedseg site check`` and ``fedseg predict`` on 2D PNG and 3D NIfTI inputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from client.config import SiteConfig
from client.trainer import SiteTrainer
from fedseg.cli import EXIT_BAD_INPUT, main
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec, TrainPlan
from shared.networks import build_network
from shared.weights import state_to_numpy
from simulations.phantoms import write_synthetic_federation


def model_file(tmp_path: Path, spec: ModelSpec) -> Path:
    path = tmp_path / "final_model.pt"
    Checkpoint(spec, state_to_numpy(build_network(spec).state_dict()), 1).save(path)
    return path


def test_site_check_lists_cases_and_flags_problems(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    site = write_synthetic_federation(tmp_path / "d", 1, 4, shape=(32, 32))[0]
    assert main(["site", "check", "--data", str(site)]) == 0
    out = capsys.readouterr().out
    assert "4 cases, 0 with problems" in out and "32x32" in out and "0,255" in out
    bad_label = site / "labelsTr" / "site-a_001.png"
    Image.fromarray(np.zeros((32, 30), np.uint8)).save(bad_label)
    assert main(["site", "check", "--data", str(site)]) == 1
    out = capsys.readouterr().out
    assert "4 cases, 1 with problems" in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("site-a_001")]
    assert "site-a_001.png" in line and "shape" in line


def test_site_check_on_nifti_volumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = write_synthetic_federation(tmp_path / "d", 1, 3, shape=(16, 16, 16))[0]
    assert main(["site", "check", "--data", str(site)]) == 0
    assert "16x16x16" in capsys.readouterr().out
    assert main(["site", "check", "--data", str(tmp_path / "nowhere")]) == EXIT_BAD_INPUT


def test_predict_png_gives_png_masks_of_the_image_size(tmp_path: Path) -> None:
    spec = ModelSpec(channels=(8, 16), patch_size=(16, 16), in_channels=3)
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 35, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / "b.jpg")
    code = main(["predict", "--model", str(model_file(tmp_path, spec)), "--input", str(images),
                 "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    a = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    b = np.asarray(Image.open(tmp_path / "out" / "b.png"))
    assert a.shape == (40, 35) and b.shape == (20, 24)
    assert set(np.unique(a)) <= {0, 255}


def test_predict_nifti_keeps_the_affine_exactly(tmp_path: Path) -> None:
    spec = ModelSpec(channels=(8, 16), patch_size=(16, 16, 16))
    affine = np.array([[0.7, 0.1, 0.0, -12.5], [0.0, 0.8, 0.2, 30.25],
                       [0.05, 0.0, 1.5, 7.0], [0.0, 0.0, 0.0, 1.0]])
    images = tmp_path / "in"
    images.mkdir()
    volume = np.random.default_rng(0).random((20, 18, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), images / "case.nii.gz")
    assert main(["predict", "--model", str(model_file(tmp_path, spec)), "--input", str(images),
                 "--output", str(tmp_path / "out"), "--device", "cpu"]) == 0
    mask = nib.load(tmp_path / "out" / "case.nii.gz")
    assert mask.shape == (20, 18, 12)
    assert np.array_equal(mask.affine, nib.load(images / "case.nii.gz").affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_predict_uses_the_sites_own_layers(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    site = write_synthetic_federation(tmp_path / "d", 1, 4, shape=(32, 32))[0]
    spec = ModelSpec(channels=(8, 16), patch_size=(16, 16), adaptation="adapter")
    trainer = SiteTrainer(SiteConfig(data_path=site, state_dir=tmp_path / "state",
                                     device="cpu", val_fraction=0.25), spec)
    result = trainer.train(trainer.weights(), TrainPlan(local_steps=2, batch_size=2))
    model = tmp_path / "final_model.pt"
    Checkpoint(spec, result.weights, 1).save(model)
    args = ["predict", "--model", str(model), "--input", str(site / "imagesTr"),
            "--output", str(tmp_path / "out"), "--device", "cpu"]
    assert main(args) == EXIT_BAD_INPUT
    assert "--site-state" in capsys.readouterr().err
    assert main([*args, "--site-state", str(tmp_path / "state")]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 4
