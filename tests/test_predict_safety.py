"""``fedseg predict`` never destroys data: every refusal is one line and writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedseg.cli import EXIT_BAD_INPUT, main
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec
from shared.networks import build_network
from shared.weights import state_to_numpy

pytestmark = pytest.mark.faults

SPEC = ModelSpec(channels=(8, 16), patch_size=(16, 16))


def model_file(tmp_path: Path, nan_in: str = "") -> Path:
    weights = state_to_numpy(build_network(SPEC).state_dict())
    if nan_in:
        weights[nan_in].flat[0] = np.nan
    path = tmp_path / "final_model.pt"
    Checkpoint(SPEC, weights, 1).save(path)
    return path


def image_folder(path: Path, names: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)).save(path / name)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def predict(tmp_path: Path, input_dir: Path, output: Path,
            capsys: pytest.CaptureFixture[str], model: Path | None = None) -> tuple[int, str]:
    code = main(["predict", "--model", str(model or model_file(tmp_path)), "--input",
                 str(input_dir), "--output", str(output), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.err


def one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == EXIT_BAD_INPUT, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedseg: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_output_equal_to_input_is_refused_and_images_survive(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = image_folder(tmp_path / "in")
    before = snapshot(images)
    code, err = predict(tmp_path, images, images, capsys)
    one_line_error(code, err, "is the input folder", "outside the --input folder")
    assert snapshot(images) == before


def test_output_inside_input_or_linked_to_it_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = image_folder(tmp_path / "in")
    before = snapshot(images)
    code, err = predict(tmp_path, images, images / "masks", capsys)
    one_line_error(code, err, "lies inside the input folder")
    link = tmp_path / "same-as-in"
    link.symlink_to(images)
    code, err = predict(tmp_path, images, link, capsys)
    one_line_error(code, err, "is the input folder")
    assert snapshot(images) == before and not (images / "masks").exists()


def test_input_inside_output_is_allowed(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Masks go only into the output's top level, so images in a sub-folder are safe.
    images = image_folder(tmp_path / "out" / "images")
    before = snapshot(images)
    code, err = predict(tmp_path, images, tmp_path / "out", capsys)
    assert code == 0, err
    assert snapshot(images) == before
    assert (tmp_path / "out" / "a.png").is_file()


def test_a_mask_that_would_replace_a_linked_input_image_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = image_folder(tmp_path / "out", ("a.png",))
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.png").symlink_to(out / "a.png")
    before = snapshot(out)
    code, err = predict(tmp_path, images, out, capsys)
    one_line_error(code, err, "a.png", "through a link", "mask would replace it")
    assert snapshot(out) == before


def test_images_with_the_same_mask_name_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = image_folder(tmp_path / "in", ("a.PNG", "a.jpg", "a.png"))
    code, err = predict(tmp_path, images, tmp_path / "out", capsys)
    line = one_line_error(code, err, "same mask file a.png", "rename one")
    assert "a.PNG" in line and "a.jpg" in line
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_is_refused(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    images = image_folder(tmp_path / "in")
    target = tmp_path / "masks.png"
    target.write_bytes(b"not a folder")
    code, err = predict(tmp_path, images, target, capsys)
    one_line_error(code, err, "masks.png", "is a file, not a folder")
    assert target.read_bytes() == b"not a folder"
    code, err = predict(tmp_path, images, target / "sub", capsys)
    one_line_error(code, err, "cannot be created", "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_output_folder_without_write_permission_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = image_folder(tmp_path / "in")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = predict(tmp_path, images, locked, capsys)
        one_line_error(code, err, "locked", "cannot be written")
        code, err = predict(tmp_path, images, locked / "new", capsys)
        one_line_error(code, err, "cannot be created: no write permission")
    finally:
        locked.chmod(0o700)


def test_output_folder_the_system_cannot_create_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # /proc refuses new entries even to root, which a permission test cannot show.
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    images = image_folder(tmp_path / "in")
    code, err = predict(tmp_path, images, Path("/proc/fedseg-masks"), capsys)
    one_line_error(code, err, "/proc/fedseg-masks", "cannot be created")


def test_checkpoint_with_nan_weights_is_refused_before_writing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = next(iter(state_to_numpy(build_network(SPEC).state_dict())))
    model = model_file(tmp_path, nan_in=name)
    images = image_folder(tmp_path / "in")
    code, err = predict(tmp_path, images, tmp_path / "out", capsys, model=model)
    one_line_error(code, err, "final_model.pt", f"parameter '{name}'", "NaN or infinite",
                   "earlier round")
    assert not (tmp_path / "out").exists()


def test_broken_link_among_the_input_images_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = image_folder(tmp_path / "in")
    (images / "c.png").symlink_to(images / "c.png")  # a loop: c.png -> c.png
    code, err = predict(tmp_path, images, tmp_path / "out", capsys)
    one_line_error(code, err, "c.png", "loops back on itself")
    assert not (tmp_path / "out").exists()
