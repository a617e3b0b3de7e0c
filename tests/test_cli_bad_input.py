"""Bad input to ``fedseg simulate``: one clear line, non-zero exit, no output presented."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedseg.cli import EXIT_BAD_INPUT, main
from shared.run_files import FINAL_MODEL, METRICS_JSON
from simulations.phantoms import write_synthetic_federation


def png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def nifti(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def good_png_site(root: Path, name: str, n: int = 4) -> Path:
    site = root / name
    rng = np.random.default_rng(0)
    for i in range(n):
        png(site / "imagesTr" / f"c{i}.png", rng.integers(0, 255, (32, 32)))
        png(site / "labelsTr" / f"c{i}.png", (rng.random((32, 32)) > 0.5) * 255)
    return site


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, must_name: str, out: Path) -> None:
    assert code == EXIT_BAD_INPUT
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedseg: error: ")
    assert must_name in lines[0]
    assert "Traceback" not in err
    assert not list(out.rglob(FINAL_MODEL)) and not list(out.rglob(METRICS_JSON))


def test_missing_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    code, err = run(["simulate", "--data", str(tmp_path / "nowhere"), "--output", str(out)],
                    capsys)
    assert_clean_failure(code, err, "nowhere", out)


def test_image_without_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good_png_site(tmp_path / "data", "a")
    site = good_png_site(tmp_path / "data", "b")
    (site / "labelsTr" / "c2.png").unlink()
    out = tmp_path / "runs"
    code, err = run(["simulate", "--data", str(tmp_path / "data"), "--output", str(out)], capsys)
    assert_clean_failure(code, err, "c2.png", out)


def test_label_shape_differs_from_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = good_png_site(tmp_path / "data", "a")
    png(site / "labelsTr" / "c1.png", np.zeros((32, 30)))
    out = tmp_path / "runs"
    code, err = run(["simulate", "--data", str(tmp_path / "data"), "--output", str(out)], capsys)
    assert_clean_failure(code, err, "c1.png", out)
    assert "(32, 30)" in err or "32x30" in err or "32, 30" in err


def test_truncated_nifti(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "data" / "mri"
    rng = np.random.default_rng(0)
    for i in range(3):
        nifti(site / "imagesTr" / f"v{i}.nii.gz", rng.random((16, 16, 16)).astype(np.float32))
        nifti(site / "labelsTr" / f"v{i}.nii.gz", (rng.random((16, 16, 16)) > 0.5).astype(np.uint8))
    broken = site / "imagesTr" / "v1.nii.gz"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises((EOFError, OSError, gzip.BadGzipFile)):
        gzip.decompress(broken.read_bytes())  # the file really is truncated
    out = tmp_path / "runs"
    code, err = run(["simulate", "--data", str(tmp_path / "data"), "--output", str(out)], capsys)
    assert_clean_failure(code, err, "v1.nii.gz", out)


def test_site_with_zero_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good_png_site(tmp_path / "data", "a")
    empty = tmp_path / "data" / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    (empty / "dataset.json").write_text(json.dumps({"training": []}))
    out = tmp_path / "runs"
    code, err = run(["simulate", "--data", str(tmp_path / "data"), "--output", str(out)], capsys)
    assert_clean_failure(code, err, "empty", out)


def test_bad_run_config_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good_png_site(tmp_path / "data", "a")
    out = tmp_path / "runs"
    code, err = run(["simulate", "--data", str(tmp_path / "data"), "--output", str(out),
                     "--run-config", "strategy='fedsgd'"], capsys)
    assert_clean_failure(code, err, "strategy", out)


def test_empty_run_config_value_is_named(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Flower's parser drops "num-server-rounds=" silently; the run would use the default.
    good_png_site(tmp_path / "data", "a")
    out = tmp_path / "runs"
    code, err = run(["simulate", "--data", str(tmp_path / "data"), "--output", str(out),
                     "--run-config", "local-steps=2 num-server-rounds="], capsys)
    assert_clean_failure(code, err, "num-server-rounds", out)
    assert err.strip() == ("fedseg: error: --run-config key 'num-server-rounds': has an empty "
                           "value; give it a value, e.g. num-server-rounds=VALUE, or leave the "
                           "key out")
    code, err = run(["simulate", "--data", str(tmp_path / "data"), "--output", str(out),
                     "--run-config", "num-server-rounds 5"], capsys)
    assert_clean_failure(code, err, "'num-server-rounds' is not KEY=VALUE", out)



def test_plan_of_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(["plan", "--data", str(tmp_path / "nowhere")], capsys)
    assert_clean_failure(code, err, "nowhere: data folder not found", tmp_path)


@pytest.mark.parametrize(("text", "message"), [
    (None, "site.toml: file not found"),
    ("dp-enabeld = true\n", "dp-enabeld"),
    ("data-path = '/srv/x'\n", "key 'data-path': is set by fedseg simulate for each site"),
], ids=["missing", "typo", "per-site-key"])
def test_plan_with_a_bad_site_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     text: str | None, message: str) -> None:
    write_synthetic_federation(tmp_path / "data", num_sites=1, cases_per_site=4, shape=(16, 16))
    site_toml = tmp_path / "site.toml"
    if text is not None:
        site_toml.write_text(text)
    code, err = run(["plan", "--data", str(tmp_path / "data"), "--site-config", str(site_toml)],
                    capsys)
    assert_clean_failure(code, err, message, tmp_path)
    assert str(site_toml) in err


@pytest.mark.parametrize("override,message", [
    ("resize='96'", "run config key 'resize': needs 2 values like patch-size, or none, got 96"),
    ("downsample='2,2,1'", "run config key 'downsample': needs 2 values like patch-size, or "
     "none, got 2,2,1"),
    ("downsample='2,2' resize='64,64'", "run config key 'downsample': and resize both resample "
     "every case: set one of them to none"),
    ("downsample='0,2'", "run config key 'downsample'"),
    ("normalization='zscor'", "run config key 'normalization': must be one of zscore, "
     "zscore-fov, got 'zscor' (did you mean 'zscore'?)"),
    ("lr-schedule='cos'", "run config key 'lr-schedule': must be one of constant, cosine, poly, "
     "got 'cos'"),
])
def test_bad_planned_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str,
                         message: str) -> None:
    out = tmp_path / "runs"
    code, err = run(["simulate", "--output", str(out), "--run-config", override], capsys)
    assert_clean_failure(code, err, message, out)
    assert "pyproject.toml or with --run-config" in err
