"""Tests for the synthetic multi-site generator."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from simulations.phantoms import (
    BACKGROUND_CEILING,
    PNG_INTENSITY_WINDOW,
    SiteStyle,
    default_site_styles,
    make_phantom,
    render_site,
    site_name,
    write_synthetic_federation,
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


def _site_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    dataset = json.loads((folder / "dataset.json").read_text())
    images = [_png(folder / entry["image"]) for entry in dataset["training"]]
    labels = [_png(folder / entry["label"]) for entry in dataset["training"]]
    return np.stack(images), np.stack(labels)


@pytest.fixture(scope="module")
def federation_2d(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_synthetic_federation(tmp_path_factory.mktemp("fed2d"), cases_per_site=12)


@pytest.fixture(scope="module")
def federation_3d(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("fed3d")
    return write_synthetic_federation(root, num_sites=2, cases_per_site=3, shape=(32, 24, 20))


# --- determinism -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 40), (20, 16, 24)])
def test_same_seed_writes_identical_bytes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    write_synthetic_federation(tmp_path / "one", 2, 3, shape, seed=5)
    write_synthetic_federation(tmp_path / "two", 2, 3, shape, seed=5)
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 2 * (1 + 2 * 3)
    assert one == two


@pytest.mark.parametrize("shape", [(32, 40), (20, 16, 24)])
def test_different_seed_writes_different_images(tmp_path: Path, shape: tuple[int, ...]) -> None:
    write_synthetic_federation(tmp_path / "one", 1, 3, shape, seed=1)
    write_synthetic_federation(tmp_path / "two", 1, 3, shape, seed=2)
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one.keys() == two.keys()
    changed = [k for k in one if "Tr" in k and one[k] != two[k]]
    assert len(changed) == 2 * 3


def test_sites_have_different_patients(federation_2d: list[Path]) -> None:
    labels = [_site_arrays(folder)[1] for folder in federation_2d]
    for a, b in itertools.combinations(labels, 2):
        assert not np.array_equal(a, b)


def test_default_styles_are_deterministic_and_stable_in_count() -> None:
    assert default_site_styles(5) == default_site_styles(5)
    assert default_site_styles(4)[3] == default_site_styles(10)[3]
    names = [s.name for s in default_site_styles(30)]
    assert names[:4] == ["site-a", "site-b", "site-c", "site-d"]
    assert names[26] == "site-aa"
    assert len(set(names)) == 30
    assert site_name(27) == "site-ab"


# --- layout ----------------------------------------------------------------------


def test_layout_matches_decathlon(federation_2d: list[Path]) -> None:
    assert [f.name for f in federation_2d] == ["site-a", "site-b", "site-c"]
    for folder in federation_2d:
        dataset = json.loads((folder / "dataset.json").read_text())
        assert dataset["name"] == folder.name
        assert dataset["tensorImageSize"] == "2D"
        assert dataset["labels"] == {"0": "background", "1": "organ"}
        assert isinstance(dataset["modality"], dict) and dataset["modality"]
        assert isinstance(dataset["description"], str)
        assert dataset["numTraining"] == 12 == len(dataset["training"])
        for entry in dataset["training"]:
            assert entry["image"].startswith("./imagesTr/") and entry["image"].endswith(".png")
            assert entry["label"] == entry["image"].replace("imagesTr", "labelsTr")
            assert (folder / entry["image"]).is_file()
            assert (folder / entry["label"]).is_file()
        assert len(list((folder / "imagesTr").iterdir())) == 12
        assert len(list((folder / "labelsTr").iterdir())) == 12


def test_rewriting_with_fewer_cases_removes_stale_cases(tmp_path: Path) -> None:
    write_synthetic_federation(tmp_path, 1, 4, (32, 32))
    (tmp_path / "site-a" / "imagesTr" / "mine.txt").write_text("not ours")
    write_synthetic_federation(tmp_path, 1, 2, (32, 32))
    images = sorted(p.name for p in (tmp_path / "site-a" / "imagesTr").iterdir())
    assert images == ["mine.txt", "site-a_000.png", "site-a_001.png"]
    assert len(list((tmp_path / "site-a" / "labelsTr").iterdir())) == 2


def test_custom_styles_name_the_folders(tmp_path: Path) -> None:
    styles = [SiteStyle("north"), SiteStyle("south", intensity_scale=0.8)]
    folders = write_synthetic_federation(tmp_path, 2, 1, (16, 16), styles=styles)
    assert folders == [tmp_path / "north", tmp_path / "south"]


# --- values ----------------------------------------------------------------------


def test_png_images_and_labels(federation_2d: list[Path]) -> None:
    for folder in federation_2d:
        images, labels = _site_arrays(folder)
        assert images.dtype == np.uint8 and images.shape == (12, 96, 96)
        assert labels.shape == images.shape
        assert set(np.unique(labels)) == {0, 255}


def test_nifti_volumes(federation_3d: list[Path]) -> None:
    for folder in federation_3d:
        dataset = json.loads((folder / "dataset.json").read_text())
        assert dataset["tensorImageSize"] == "3D"
        assert dataset["numTraining"] == 3
        for entry in dataset["training"]:
            assert entry["image"].endswith(".nii.gz")
            image = nib.load(folder / entry["image"])
            label = nib.load(folder / entry["label"])
            assert image.shape == label.shape == (32, 24, 20)
            assert image.get_data_dtype() == np.float32
            assert label.get_data_dtype() == np.uint8
            assert np.allclose(image.header.get_zooms(), 1.0)
            assert np.allclose(image.affine, label.affine)
            values = np.asarray(label.dataobj)
            assert set(np.unique(values)) == {0, 1}
            assert 0.02 < values.mean() < 0.4
            assert np.isfinite(np.asarray(image.dataobj)).all()


def test_organ_fraction_is_sane_and_organ_stays_inside() -> None:
    for seed, shape in itertools.product(range(25), [(96, 96), (48, 64), (32, 32, 32)]):
        _, label = make_phantom(np.random.default_rng(seed), shape)
        assert label.dtype == np.uint8
        assert 0.03 <= label.mean() <= 0.40, (seed, shape, label.mean())
        # One connected organ, not touching any face of the image.
        assert ndimage.label(label)[1] == 1
        for axis in range(label.ndim):
            assert not label.take([0, -1], axis=axis).any()


def test_phantom_image_is_in_unit_range_and_organ_is_brighter() -> None:
    for shape in [(96, 96), (16, 16), (16, 20, 24)]:
        image, label = make_phantom(np.random.default_rng(3), shape)
        assert image.dtype == np.float32 and image.shape == label.shape == shape
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert image[label == 1].mean() > image[label == 0].mean() + 0.3


def test_distractors_are_present_but_not_labelled() -> None:
    # Background texture never exceeds BACKGROUND_CEILING, so anything brighter
    # outside the (dilated) organ is a distractor; without distractors this is empty.
    organ_bright = 0
    for seed, shape in itertools.product(range(12), [(96, 96), (32, 32, 32)]):
        image, label = make_phantom(np.random.default_rng(seed), shape)
        outside = ~ndimage.binary_dilation(label == 1, iterations=1)
        distractor = outside & (image > BACKGROUND_CEILING + 0.02)
        assert distractor.sum() >= 20, (seed, shape)
        # Some distractors are as bright as the organ, so a threshold cannot separate them.
        organ_low = np.percentile(image[label == 1], 5)
        organ_bright += int((outside & (image >= organ_low)).sum() >= 5)
    assert organ_bright >= 3


def test_distractors_survive_site_rendering(federation_2d: list[Path]) -> None:
    lo, hi = PNG_INTENSITY_WINDOW
    images, labels = _site_arrays(federation_2d[0])  # site-a: no bias, low noise
    values = lo + images / 255.0 * (hi - lo)
    for value, label in zip(values, labels, strict=True):
        outside = ~ndimage.binary_dilation(label == 255, iterations=2)
        # Median and opening remove noisy background pixels (without distractors
        # nothing is left: background is at most 0.38); a blob survives them.
        bright = ndimage.median_filter(value, 3) > 0.41
        assert ndimage.binary_opening(outside & bright).sum() >= 20


# --- sites differ, task stays solvable ------------------------------------------


def test_sites_really_differ(federation_2d: list[Path]) -> None:
    stats = []
    for folder in federation_2d:
        images, _ = _site_arrays(folder)
        stats.append((float(images.mean()), float(images.std())))
    for (mean_a, std_a), (mean_b, std_b) in itertools.combinations(stats, 2):
        ratio = max(std_a, std_b) / min(std_a, std_b)
        assert abs(mean_a - mean_b) > 5 or ratio > 1.25, stats


def test_default_styles_differ_clearly() -> None:
    styles = default_site_styles(3)
    fields = ("intensity_scale", "intensity_offset", "noise_std", "blur_sigma", "bias_strength")
    for a, b in itertools.combinations(styles, 2):
        assert all(getattr(a, f) != getattr(b, f) for f in fields)
    assert {s.resolution_factor for s in styles} == {1, 2}


@pytest.mark.parametrize("style", default_site_styles(6), ids=lambda s: s.name)
def test_every_site_keeps_organ_contrast_above_noise(style: SiteStyle) -> None:
    assert style.worst_contrast_to_noise > 4
    ratios = []
    for seed in range(8):
        image, label = make_phantom(np.random.default_rng(seed), (96, 96))
        rendered = render_site(image, style, np.random.default_rng(100 + seed))
        core = ndimage.binary_erosion(label == 1, iterations=3)
        background = (image <= BACKGROUND_CEILING) & ~ndimage.binary_dilation(
            label == 1, iterations=3
        )
        contrast = rendered[core].mean() - rendered[background].mean()
        ratios.append(contrast / rendered[background].std())
    assert min(ratios) > 3, ratios


# --- render_site -----------------------------------------------------------------


def test_render_site_applies_scale_offset_and_resolution() -> None:
    image = np.random.default_rng(0).random((33, 34)).astype(np.float32)
    plain = SiteStyle("plain", intensity_scale=2.0, intensity_offset=-0.5, noise_std=0.0)
    out = render_site(image, plain, np.random.default_rng(0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, image * 2.0 - 0.5, atol=1e-6)

    blocky = dataclasses.replace(plain, resolution_factor=2)
    out = render_site(image, blocky, np.random.default_rng(0))
    assert out.shape == image.shape
    assert np.array_equal(out[0:32:2, 0:34:2], out[1:32:2, 1:34:2])
    assert not np.array_equal(out[0:30:2], out[2:32:2])


def test_render_site_bias_blur_and_noise_change_the_image() -> None:
    image, _ = make_phantom(np.random.default_rng(0), (24, 24, 24))
    base = SiteStyle("base", noise_std=0.0)
    for change in ({"bias_strength": 0.3}, {"blur_sigma": 1.0}, {"noise_std": 0.05}):
        styled = dataclasses.replace(base, **change)  # type: ignore[arg-type]
        out = render_site(image, styled, np.random.default_rng(0))
        assert out.shape == image.shape
        assert np.abs(out - image).mean() > 0.005, change


# --- bad arguments ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_sites": 0}, "num_sites"),
        ({"cases_per_site": 0}, "cases_per_site"),
        ({"shape": (96,)}, "shape"),
        ({"shape": (16, 16, 16, 16)}, "shape"),
        ({"shape": (96, 15)}, "at least 16"),
        ({"shape": (32, 32, 8)}, "at least 16"),
        ({"seed": -1}, "seed"),
        ({"num_sites": 2, "styles": [SiteStyle("x")]}, "styles"),
        ({"num_sites": 2, "styles": [SiteStyle("x"), SiteStyle("x")]}, "distinct"),
    ],
)
def test_bad_arguments_raise_value_error(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        write_synthetic_federation(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"name": "a/b"},
        {"name": "s", "intensity_scale": 0.0},
        {"name": "s", "bias_strength": 1.0},
        {"name": "s", "noise_std": -0.1},
        {"name": "s", "blur_sigma": float("nan")},
        {"name": "s", "resolution_factor": 0},
    ],
)
def test_bad_site_style_raises_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SiteStyle(**kwargs)  # type: ignore[arg-type]


def test_bad_shapes_and_counts_rejected_by_helpers() -> None:
    with pytest.raises(ValueError, match="shape"):
        make_phantom(np.random.default_rng(0), (8, 8))
    with pytest.raises(ValueError, match="num_sites"):
        default_site_styles(0)
    with pytest.raises(ValueError, match="2D or 3D"):
        render_site(np.zeros(16, dtype=np.float32), SiteStyle("s"), np.random.default_rng(0))
