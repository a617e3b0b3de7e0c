"""Wrong labels, unreadable links and 4D series: named by ``site check``, refused by training."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from client.data_contract import discover_cases, load_case
from fedseg.cli import EXIT_BAD_INPUT, main
from shared.errors import DataError

pytestmark = pytest.mark.faults

SIZE = 48


def disc_mask(seed: int) -> np.ndarray:
    """A {0, 255} mask: a disc plus thin lines, like vessels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(14, SIZE - 14, 2)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < 80) | (xx % 9 == 0)
    return (mask * 255).astype(np.uint8)


def png_site(root: Path, n: int = 4) -> Path:
    site = root / "site"
    (site / "imagesTr").mkdir(parents=True)
    (site / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        mask = disc_mask(i)
        image = (0.5 * mask + rng.integers(0, 120, mask.shape)).astype(np.uint8)
        Image.fromarray(image).save(site / "imagesTr" / f"c{i}.png")
        Image.fromarray(mask).save(site / "labelsTr" / f"c{i}.png")
    return site


def check(site: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = main(["site", "check", "--data", str(site), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def case_line(out: str, case: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith(case + " ")]
    return line


def flagged(site: Path, capsys: pytest.CaptureFixture[str], case: str, *needles: str,
            extra: tuple[str, ...] = ()) -> str:
    """Assert site check exits 1 with exactly ``case`` flagged, its line naming ``needles``."""
    code, out, err = check(site, capsys, *extra)
    assert code == 1, out + err
    assert "1 with problems" in out, out
    line = case_line(out, case)
    for needle in needles:
        assert needle in line, line
    return line


def train_refuses(site: Path, case: str, match: str, in_channels: int = 1,
                  spatial_dims: int = 2) -> None:
    (ref,) = [r for r in discover_cases(site) if r.case_id == case]
    with pytest.raises(DataError, match=match):
        load_case(ref, in_channels, 2, spatial_dims)


def test_good_site_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(png_site(tmp_path), capsys)
    assert code == 0, out + err
    assert "4 cases, 0 with problems" in out


def test_mask_in_the_alpha_channel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = png_site(tmp_path)
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 3] = disc_mask(1)
    Image.fromarray(rgba, mode="RGBA").save(site / "labelsTr" / "c1.png")
    flagged(site, capsys, "c1", "c1.png", "alpha (transparency) channel", "R/G/B channel(s)",
            "would read as empty", "getchannel('A')")
    train_refuses(site, "c1", "alpha")
    grey_alpha = np.stack([np.full((SIZE, SIZE), 255, np.uint8), disc_mask(2)], axis=-1)
    Image.fromarray(grey_alpha, mode="LA").save(site / "labelsTr" / "c2.png")
    train_refuses(site, "c2", "L channel")


def test_jpeg_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = png_site(tmp_path)
    (site / "labelsTr" / "c1.png").unlink()
    Image.fromarray(disc_mask(1)).save(site / "labelsTr" / "c1.jpg", quality=75)
    flagged(site, capsys, "c1", "c1.jpg", "is a JPEG label", "false foreground",
            "save the mask losslessly as PNG or NIfTI")
    train_refuses(site, "c1", "JPEG label")


def test_png_label_with_jpeg_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = png_site(tmp_path)
    Image.fromarray(disc_mask(1)).save(tmp_path / "once.jpg", quality=75)
    shutil.copy(site / "labelsTr" / "c1.png", tmp_path / "original.png")
    Image.open(tmp_path / "once.jpg").save(site / "labelsTr" / "c1.png")
    flagged(site, capsys, "c1", "c1.png", "trace of JPEG compression",
            "set values >= 128 to 1")
    train_refuses(site, "c1", "JPEG compression")


def test_image_given_as_its_own_label(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    site = png_site(tmp_path)
    shutil.copy(site / "imagesTr" / "c1.png", site / "labelsTr" / "c1.png")
    flagged(site, capsys, "c1", "c1.png", "is identical to its image c1.png, not a mask",
            "point the label at the segmentation mask")
    train_refuses(site, "c1", "identical to its image")


def test_label_correlated_with_its_image(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # An RGB image with its grey version as the label: not identical, still a picture.
    site = png_site(tmp_path)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    (site / "imagesTr" / "c1.png").unlink()
    Image.fromarray(rgb).save(site / "imagesTr" / "c1.png")
    Image.fromarray(rgb).convert("L").save(site / "labelsTr" / "c1.png")
    flagged(site, capsys, "c1", "looks like an image, not a mask", "distinct values",
            "of pixels between background and foreground", "with its image c1.png",
            extra=("--in-channels", "3"))
    train_refuses(site, "c1", "looks like an image", in_channels=3)


def test_label_that_follows_its_image_closely(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Mostly black and white like a mask, but a re-quantised copy of the image: only the
    # correlation gives it away.
    site = png_site(tmp_path)
    rng = np.random.default_rng(4)
    image = disc_mask(1).copy()
    speckle = rng.random(image.shape) < 0.3
    image[speckle] = rng.integers(0, 256, int(speckle.sum()))
    Image.fromarray(image).save(site / "imagesTr" / "c1.png")
    Image.fromarray(image // 4 * 4).save(site / "labelsTr" / "c1.png")
    line = flagged(site, capsys, "c1", "looks like an image, not a mask", "correlation +")
    mid = int(line.split("distinct values, ")[1].split("%")[0])
    assert mid < 50  # so the correlation, not the grey levels, refused it
    train_refuses(site, "c1", "looks like an image")


def test_soft_and_anti_aliased_masks_pass(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    site = png_site(tmp_path)
    yy, xx = np.mgrid[:4 * SIZE, :4 * SIZE]
    big = (((yy - 90) ** 2 + (xx - 100) ** 2 < 50 ** 2) * 255).astype(np.uint8)
    smooth = Image.fromarray(big).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    assert len(np.unique(np.asarray(smooth))) > 32
    smooth.save(site / "labelsTr" / "c1.png")
    code, out, err = check(site, capsys)
    assert code == 0, out + err


def test_unexpected_label_values_are_named_with_the_mapping(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = png_site(tmp_path)
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[5:15, 5:15] = 3
    label[20:30, 20:30] = 7
    Image.fromarray(label).save(site / "labelsTr" / "c1.png")
    flagged(site, capsys, "c1", "0,3,7", "label values 0,3,7 are not a binary mask",
            "remap them to 0..2 (the planner then plans num-classes 3", "num-classes 8",
            "remap every non-zero value to 1")
    # Training keeps the documented merge (any non-zero value is foreground).
    (ref,) = [r for r in discover_cases(site) if r.case_id == "c1"]
    assert set(np.unique(load_case(ref, 1, 2, 2).label)) == {0, 1}
    _, out, _ = check(site, capsys, "--num-classes", "8")
    assert case_line(out, "c1").endswith(" ok")
    # Remapped to the codes 0..2 (the other cases' 255 to 1), the site's labels are
    # what the planner counts as 3 classes.
    label[label == 3], label[label == 7] = 1, 2
    Image.fromarray(label).save(site / "labelsTr" / "c1.png")
    for other in ("c0", "c2", "c3"):
        path = site / "labelsTr" / f"{other}.png"
        Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8)).save(path)
    code, out, _ = check(site, capsys)
    assert code == 0 and case_line(out, "c1").endswith(" ok")
    assert "labels: 3 classes, background included, as the planner counts" in out
    code, out, _ = check(site, capsys, "--num-classes", "2")
    assert code == 1 and "num-classes 2 would merge" in case_line(out, "c1")


def test_case_behind_a_symlink_loop_is_named(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    site = png_site(tmp_path)
    (site / "imagesTr" / "c9.png").symlink_to(site / "imagesTr" / "c9b.png")
    (site / "imagesTr" / "c9b.png").symlink_to(site / "imagesTr" / "c9.png")
    code, out, err = check(site, capsys)
    assert code == EXIT_BAD_INPUT, out
    (line,) = err.splitlines()
    assert line.startswith("fedseg: error: ") and "c9.png" in line
    assert "loops back on itself" in line and "point the link at the real file" in line


def test_label_behind_a_dangling_link_is_named(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    site = png_site(tmp_path)
    (site / "labelsTr" / "c1.png").unlink()
    (site / "labelsTr" / "c1.png").symlink_to(tmp_path / "moved-away.png")
    code, _, err = check(site, capsys)
    assert code == EXIT_BAD_INPUT
    (line,) = err.splitlines()
    assert "c1.png" in line and "moved-away.png, which does not exist" in line
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(site)


def nifti_site(root: Path, time_points: int) -> Path:
    site = root / "mri"
    (site / "imagesTr").mkdir(parents=True)
    (site / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        label = np.zeros((16, 16, 16), np.uint8)
        label[4:10, 5:11, 3 + i:9 + i] = 1
        series = rng.random((16, 16, 16, time_points)).astype(np.float32) + label[..., None]
        nib.save(nib.Nifti1Image(series, np.eye(4)), site / "imagesTr" / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), site / "labelsTr" / f"v{i}.nii.gz")
    return site


def test_4d_series_is_refused_unless_channels_are_declared(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = nifti_site(tmp_path, 3)
    code, out, err = check(site, capsys)
    assert code == 1, out + err
    line = case_line(out, "v0")
    assert "is a 4D series of 3 volumes (shape (16, 16, 16, 3))" in line
    assert "in-channels = 1" in line and "averaged as if they were colours" in line
    assert "set in-channels = 3" in line and "one volume per case" in line
    train_refuses(site, "v0", "4D series", spatial_dims=3)
    code, out, err = check(site, capsys, "--in-channels", "3")
    assert code == 0, out + err
    (ref,) = [r for r in discover_cases(site) if r.case_id == "v0"]
    assert load_case(ref, 3, 2, 3).image.shape == (3, 16, 16, 16)

