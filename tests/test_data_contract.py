"""Tests of client.imaging, client.transforms and client.data_contract on synthetic files."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from client.data_contract import (
    CaseRef,
    discover_cases,
    load_case,
    load_image_for_inference,
    split_cases,
)
from client.imaging import read_image, strip_suffix, write_mask
from client.transforms import (
    label_to_single_channel,
    labels_to_classes,
    match_channels,
    to_channel_first,
)
from shared.errors import DataError
from shared.normalization import zscore as normalize_intensity

AFFINE = np.array(
    [
        [0.625, 0.0, 0.0, -12.5],
        [0.0, 0.625, 0.0, 7.0],
        [0.0, 0.0, 1.25, 3.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
P = Path("case.png")


# --------------------------------------------------------------------------- helpers


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def write_jpeg(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, quality=95)
    return path


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def rgb(h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def vessel_mask(h: int = 12, w: int = 10) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[2:5, 1:7] = 255
    return mask


def make_2d_site(root: Path, names: list[str], image_suffix: str = ".png") -> Path:
    for i, name in enumerate(names):
        if image_suffix == ".jpg":
            write_jpeg(root / "imagesTr" / f"{name}.jpg", rgb(seed=i))
        else:
            write_png(root / "imagesTr" / f"{name}{image_suffix}", rgb(seed=i))
        write_png(root / "labelsTr" / f"{name}.png", vessel_mask())
    return root


def make_ref(root: Path, image: Path, label: Path) -> CaseRef:
    return CaseRef(case_id=strip_suffix(image.name), patient_id="p", image=image, label=label)


# --------------------------------------------------------------------------- transforms


def test_normalize_intensity_exact_values_and_constant_channel() -> None:
    image = np.array([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    out = normalize_intensity(image)
    s = np.sqrt(1.25)
    expected = np.array([[[-1.5, -0.5], [0.5, 1.5]]]) / s
    assert out.dtype == np.float32
    assert out.shape == (2, 2, 2)
    np.testing.assert_allclose(out[0], expected[0], rtol=1e-6)
    assert np.array_equal(out[1], np.zeros((2, 2), dtype=np.float32))


def test_normalize_intensity_integer_input() -> None:
    out = normalize_intensity(np.array([[10, 30]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([[-1.0, 1.0]], dtype=np.float32))


def test_labels_binary_zero_one() -> None:
    label = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    out = labels_to_classes(label, 2, P)
    assert out.dtype == np.int64
    assert out.tolist() == [[0, 1], [1, 0]]


def test_labels_binary_zero_255() -> None:
    out = labels_to_classes(np.array([0, 255, 255, 0], dtype=np.uint8), 2, P)
    assert out.tolist() == [0, 1, 1, 0]


def test_labels_binary_float_integer_valued() -> None:
    out = labels_to_classes(np.array([0.0, 1.0, 2.0]), 2, P)
    assert out.tolist() == [0, 1, 1]


def test_labels_soft_mask_thresholds_at_half_max() -> None:
    out = labels_to_classes(np.array([0.0, 0.2, 0.44, 0.45, 0.9], dtype=np.float32), 2, P)
    assert out.tolist() == [0, 0, 0, 1, 1]
    scaled = labels_to_classes(np.array([0.0, 60.5, 127.4, 127.5, 255.0]), 2, P)
    assert scaled.tolist() == [0, 0, 0, 1, 1]


def test_labels_multiclass_kept() -> None:
    label = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    out = labels_to_classes(label, 4, P)
    assert out.dtype == np.int64
    assert out.tolist() == [[0, 1], [2, 3]]
    assert labels_to_classes(label.astype(np.float32), 4, P).tolist() == [[0, 1], [2, 3]]


def test_labels_multiclass_out_of_range() -> None:
    with pytest.raises(DataError, match=r"case\.png.*values 3, 7 outside \[0, 3\)"):
        labels_to_classes(np.array([0, 1, 3, 7]), 3, P)


def test_labels_multiclass_non_integer() -> None:
    with pytest.raises(DataError, match=r"case\.png.*non-integer"):
        labels_to_classes(np.array([0.0, 0.5, 2.0]), 3, P)


def test_labels_negative_rejected() -> None:
    with pytest.raises(DataError, match=r"case\.png.*negative"):
        labels_to_classes(np.array([-1.5, 0.2, 1.0]), 2, P)


def test_match_channels_repeat_grey() -> None:
    grey = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    out = match_channels(grey, 3, P)
    assert out.shape == (3, 2, 2)
    for c in range(3):
        assert np.array_equal(out[c], grey[0])


def test_match_channels_rgb_and_rgba_to_grey_average() -> None:
    image = np.stack([np.full((2, 2), 3.0), np.full((2, 2), 6.0), np.full((2, 2), 12.0)])
    assert np.array_equal(match_channels(image, 1, P), np.full((1, 2, 2), 7.0))
    rgba = np.concatenate([image, np.full((1, 2, 2), 255.0)])
    assert np.array_equal(match_channels(rgba, 1, P), np.full((1, 2, 2), 7.0))
    assert np.array_equal(match_channels(rgba, 3, P), image)
    assert match_channels(image, 3, P) is image


def test_match_channels_mismatch() -> None:
    with pytest.raises(DataError, match=r"case\.png: has 2 channels.*in-channels = 1"):
        match_channels(np.zeros((2, 3, 3)), 1, P)
    with pytest.raises(DataError, match=r"case\.png: has 3 channels"):
        match_channels(np.zeros((3, 3, 3)), 2, P)


def test_to_channel_first_layouts() -> None:
    assert to_channel_first(np.zeros((4, 5)), 2, P).shape == (1, 4, 5)
    image = rgb(4, 5)
    cf = to_channel_first(image, 2, P)
    assert cf.shape == (3, 4, 5)
    assert np.array_equal(cf[1], image[:, :, 1])
    assert to_channel_first(np.zeros((4, 5, 6, 1, 2)), 3, P).shape == (2, 4, 5, 6)
    with pytest.raises(DataError, match=r"case\.png: has shape \(4,\)"):
        to_channel_first(np.zeros(4), 2, P)


def test_label_to_single_channel() -> None:
    grey = vessel_mask()
    colour = np.stack([grey, grey, grey, np.full_like(grey, 255)])
    assert np.array_equal(label_to_single_channel(colour, P), grey)
    colour[1, 0, 0] = 7
    with pytest.raises(DataError, match=r"case\.png.*channels differ"):
        label_to_single_channel(colour, P)


# --------------------------------------------------------------------------- imaging


def test_strip_suffix() -> None:
    assert strip_suffix("chase_01L.jpg") == "chase_01L"
    assert strip_suffix("x.nii.gz") == "x"
    assert strip_suffix("x.nii") == "x"
    assert strip_suffix("a.b.JPEG") == "a.b"
    assert strip_suffix("notes.txt") == "notes.txt"


def test_png_round_trip_keeps_orientation(tmp_path: Path) -> None:
    image = rgb(7, 11)
    src = read_image(write_png(tmp_path / "img.png", image))
    assert src.fmt == "png"
    assert src.array.shape == (7, 11, 3)
    assert np.array_equal(src.array, image)
    assert np.array_equal(src.affine, np.eye(4))
    assert src.spacing == (1.0, 1.0)
    assert src.header is None

    binary = np.zeros((7, 11), dtype=np.int64)
    binary[1:3, 2:9] = 1
    write_mask(binary, src, tmp_path / "out" / "mask.png")
    back = read_image(tmp_path / "out" / "mask.png")
    assert back.array.dtype == np.uint8
    assert np.array_equal(back.array, binary * 255)
    assert np.array_equal(labels_to_classes(back.array, 2, P), binary)

    multi = np.zeros((7, 11), dtype=np.uint8)
    multi[0, :] = 2
    multi[:, 0] = 1
    write_mask(multi, src, tmp_path / "multi.png")
    assert np.array_equal(read_image(tmp_path / "multi.png").array, multi)
    # No temporary files left behind by the atomic write.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "multi.png", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mask.png"]


def test_png_multiclass_keeps_zero_one_with_num_classes(tmp_path: Path) -> None:
    src = read_image(write_png(tmp_path / "img.png", rgb(4, 4)))
    mask = np.eye(4, dtype=np.uint8)
    write_mask(mask, src, tmp_path / "m.png", num_classes=3)
    assert np.array_equal(read_image(tmp_path / "m.png").array, mask)


def test_nifti_round_trip_keeps_affine_and_header(tmp_path: Path) -> None:
    volume = np.random.default_rng(1).normal(size=(9, 8, 6)).astype(np.float32)
    src = read_image(write_nifti(tmp_path / "vol.nii.gz", volume))
    assert src.fmt == "nifti"
    assert np.array_equal(src.array, volume)
    assert np.array_equal(src.affine, AFFINE)
    assert src.spacing == (0.625, 0.625, 1.25)
    assert src.header is not None

    mask = (volume > 0.5).astype(np.uint8)
    mask[0, 0, 0] = 2
    write_mask(mask, src, tmp_path / "pred.nii.gz")
    back = read_image(tmp_path / "pred.nii.gz")
    assert np.array_equal(back.affine, src.affine)
    assert back.array.dtype == np.uint8
    assert np.array_equal(back.array, mask)
    assert back.spacing == src.spacing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz", "vol.nii.gz"]


def test_write_mask_refuses_jpeg(tmp_path: Path) -> None:
    src = read_image(write_png(tmp_path / "img.png", rgb(4, 4)))
    with pytest.raises(DataError, match=r"mask\.jpg.*JPEG"):
        write_mask(np.zeros((4, 4), dtype=np.uint8), src, tmp_path / "mask.jpg")


@pytest.mark.parametrize("name", ["vol.nii.gz", "img.png", "img.jpg"])
def test_truncated_file_is_data_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".nii.gz"):
        write_nifti(path, np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
    elif name.endswith(".png"):
        write_png(path, rgb(32, 32))
    else:
        write_jpeg(path, rgb(32, 32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{name}: cannot be read") as info:
        read_image(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["junk.nii.gz", "junk.nii", "junk.png", "junk.jpeg"])
def test_garbage_file_is_data_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"definitely not an image " * 20)
    with pytest.raises(DataError, match=rf"{name}: cannot be read"):
        read_image(path)


def test_unsupported_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"scan\.tif.*not a supported"):
        read_image(tmp_path / "scan.tif")
    with pytest.raises(DataError, match=r"gone\.png: does not exist"):
        read_image(tmp_path / "gone.png")


# --------------------------------------------------------------------------- discovery


def test_discover_by_file_name_pairs_jpg_with_png(tmp_path: Path) -> None:
    site = make_2d_site(tmp_path / "CHASE", ["chase_02L", "chase_01R", "chase_01L"], ".jpg")
    (site / "imagesTr" / ".DS_Store").write_bytes(b"x")
    (site / "imagesTr" / "README.txt").write_text("not an image")
    cases = discover_cases(site)
    assert [c.case_id for c in cases] == ["chase_01L", "chase_01R", "chase_02L"]
    assert [c.patient_id for c in cases] == ["chase_01", "chase_01", "chase_02"]
    assert cases[0].image == site / "imagesTr" / "chase_01L.jpg"
    assert cases[0].label == site / "labelsTr" / "chase_01L.png"


def test_discover_with_dataset_json(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_png(site / "imagesTr" / "b.png", rgb())
    write_png(site / "imagesTr" / "a.png", rgb())
    write_png(site / "masks" / "a_seg.png", vessel_mask())
    write_png(site / "masks" / "b_seg.png", vessel_mask())
    write_png(site / "imagesTr" / "unlisted.png", rgb())  # not in the json: ignored
    training = [
        {"image": "./imagesTr/b.png", "label": "./masks/b_seg.png"},
        {"image": "./imagesTr/a.png", "label": "./masks/a_seg.png", "patient": "P7"},
    ]
    (site / "dataset.json").write_text(json.dumps({"name": "x", "training": training}))
    cases = discover_cases(site)
    assert cases == [
        CaseRef("a", "P7", site / "imagesTr" / "a.png", site / "masks" / "a_seg.png"),
        CaseRef("b", "b", site / "imagesTr" / "b.png", site / "masks" / "b_seg.png"),
    ]


def test_discover_nnunet_channel_suffix(tmp_path: Path) -> None:
    site = tmp_path / "mri"
    for name in ("case_002", "case_001"):
        write_nifti(site / "imagesTr" / f"{name}_0000.nii.gz", np.zeros((4, 4, 4), np.float32))
        write_nifti(site / "labelsTr" / f"{name}.nii.gz", np.zeros((4, 4, 4), np.uint8))
    cases = discover_cases(site)
    assert [c.case_id for c in cases] == ["case_001", "case_002"]
    assert cases[0].image.name == "case_001_0000.nii.gz"
    assert cases[0].label.name == "case_001.nii.gz"


def test_patient_pattern(tmp_path: Path) -> None:
    site = make_2d_site(tmp_path / "s", ["pat3_scan1", "pat3_scan2", "pat4_scan1"])
    cases = discover_cases(site, r"^(pat\d+)_")
    assert [c.patient_id for c in cases] == ["pat3", "pat3", "pat4"]


def test_default_patient_rule(tmp_path: Path) -> None:
    names = ["drive_21", "eye_3-left", "eye_3_right", "img_7R", "ward_L"]
    site = make_2d_site(tmp_path / "s", names)
    patients = {c.case_id: c.patient_id for c in discover_cases(site)}
    assert patients == {
        "drive_21": "drive_21",
        "eye_3-left": "eye_3",
        "eye_3_right": "eye_3",
        "img_7R": "img_7",
        "ward_L": "ward_L",
    }


# --------------------------------------------------------------------------- split


def chase_cases(n: int) -> list[CaseRef]:
    root = Path("/data/CHASE")
    return [
        CaseRef(
            f"chase_{i:02d}{eye}",
            f"chase_{i:02d}",
            root / "imagesTr" / f"chase_{i:02d}{eye}.jpg",
            root / "labelsTr" / f"chase_{i:02d}{eye}.png",
        )
        for i in range(1, n + 1)
        for eye in "LR"
    ]


def test_split_keeps_both_eyes_of_a_child_together() -> None:
    cases = chase_cases(10)
    train, val = split_cases(cases, 0.3)
    train_patients = {c.patient_id for c in train}
    val_patients = {c.patient_id for c in val}
    assert len(val_patients) == 3
    assert not train_patients & val_patients
    assert len(train) + len(val) == len(cases)
    for c in val:
        assert {"L": "R", "R": "L"}[c.case_id[-1]] in {v.case_id[-1] for v in val
                                                        if v.patient_id == c.patient_id}
    assert [c.case_id for c in train] == sorted(c.case_id for c in train)
    assert [c.case_id for c in val] == sorted(c.case_id for c in val)


def test_split_is_deterministic_under_shuffling() -> None:
    cases = chase_cases(9)
    expected = split_cases(cases, 0.25)
    # The hash order is fixed: compute it independently.
    patients = {c.patient_id for c in cases}
    ranked = sorted(patients, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    assert {c.patient_id for c in expected[1]} == set(ranked[:2])  # round(0.25 * 9) == 2
    rng = random.Random(0)
    for _ in range(5):
        shuffled = list(cases)
        rng.shuffle(shuffled)
        assert split_cases(shuffled, 0.25) == expected


def test_split_zero_fraction_and_minimum_one() -> None:
    cases = chase_cases(4)
    train, val = split_cases(list(reversed(cases)), 0.0)
    assert val == []
    assert train == sorted(cases, key=lambda c: c.case_id)
    train, val = split_cases(cases, 0.01)
    assert len({c.patient_id for c in val}) == 1
    train, val = split_cases(chase_cases(2), 0.9)  # never all patients in validation
    assert len({c.patient_id for c in val}) == 1 and len(train) == 2


def test_split_one_patient_names_site_folder() -> None:
    cases = chase_cases(1)
    with pytest.raises(DataError, match=r"/data/CHASE: validation needs at least 2 patients"):
        split_cases(cases, 0.2)
    assert split_cases(cases, 0.0) == (cases, [])


# --------------------------------------------------------------------------- loading


def test_load_case_rgb_jpeg_with_255_label(tmp_path: Path) -> None:
    site = make_2d_site(tmp_path / "CHASE", ["chase_01L", "chase_01R"], ".jpg")
    ref = discover_cases(site)[0]
    case = load_case(ref, in_channels=1, num_classes=2, spatial_dims=2)
    assert case.case_id == "chase_01L" and case.patient_id == "chase_01"
    assert case.image.dtype == np.float32 and case.image.shape == (1, 12, 10)
    np.testing.assert_allclose(case.image.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(case.image.std(), 1.0, atol=1e-5)
    assert case.label.dtype == np.int64
    assert np.array_equal(case.label, (vessel_mask() > 0).astype(np.int64))
    assert case.source.fmt == "jpeg"
    three = load_case(ref, in_channels=3, num_classes=2, spatial_dims=2)
    assert three.image.shape == (3, 12, 10)


def test_load_case_rgb_label_with_equal_channels(tmp_path: Path) -> None:
    site = tmp_path / "s"
    write_png(site / "imagesTr" / "a.png", rgb()[:, :, 0])
    mask = vessel_mask()
    write_png(site / "labelsTr" / "a.png", np.stack([mask, mask, mask], axis=-1))
    case = load_case(discover_cases(site)[0], 1, 2, 2)
    assert np.array_equal(case.label, (mask > 0).astype(np.int64))


def test_load_case_nifti_3d_multiclass(tmp_path: Path) -> None:
    site = tmp_path / "mri"
    volume = np.random.default_rng(2).normal(5.0, 2.0, size=(8, 6, 4)).astype(np.float32)
    label = np.zeros((8, 6, 4), dtype=np.uint8)
    label[2:4, 2:4, 1:3] = 2
    label[0, 0, 0] = 1
    write_nifti(site / "imagesTr" / "v.nii.gz", volume)
    write_nifti(site / "labelsTr" / "v.nii.gz", label)
    case = load_case(discover_cases(site)[0], in_channels=1, num_classes=3, spatial_dims=3)
    assert case.image.shape == (1, 8, 6, 4)
    np.testing.assert_allclose(case.image[0], (volume - volume.mean()) / volume.std(), atol=1e-5)
    assert np.array_equal(case.label, label.astype(np.int64))
    assert np.array_equal(case.source.affine, AFFINE)


def test_load_image_for_inference_matches_load_case(tmp_path: Path) -> None:
    site = make_2d_site(tmp_path / "s", ["a"])
    ref = discover_cases(site)[0]
    image, source = load_image_for_inference(ref.image, 1, 2)
    assert np.array_equal(image, load_case(ref, 1, 2, 2).image)
    assert source.fmt == "png"


# --------------------------------------------------------------------------- errors


def test_missing_site_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: site folder does not exist"):
        discover_cases(tmp_path / "nowhere")


def test_site_without_cases(tmp_path: Path) -> None:
    (tmp_path / "empty" / "imagesTr").mkdir(parents=True)
    (tmp_path / "empty" / "labelsTr").mkdir()
    with pytest.raises(DataError, match=r"empty: site folder contains no cases.*imagesTr/"):
        discover_cases(tmp_path / "empty")
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match=r"bare: site folder contains no cases.*Decathlon"):
        discover_cases(tmp_path / "bare")


def test_image_without_label(tmp_path: Path) -> None:
    site = make_2d_site(tmp_path / "s", ["a"])
    write_png(site / "imagesTr" / "orphan_7.png", rgb())
    with pytest.raises(DataError, match=r"orphan_7\.png: has no label"):
        discover_cases(site)


def test_duplicate_case_id(tmp_path: Path) -> None:
    site = make_2d_site(tmp_path / "s", ["a"])
    write_jpeg(site / "imagesTr" / "a.jpg", rgb())
    with pytest.raises(DataError, match=r"a\.png: has the same case id 'a' as a\.jpg"):
        discover_cases(site)


def test_dataset_json_missing_file(tmp_path: Path) -> None:
    site = make_2d_site(tmp_path / "s", ["a"])
    training = [
        {"image": "./imagesTr/a.png", "label": "./labelsTr/a.png"},
        {"image": "./imagesTr/a.png", "label": "./labelsTr/lost_label.png"},
    ]
    (site / "dataset.json").write_text(json.dumps({"training": training}))
    with pytest.raises(DataError, match=r"lost_label\.png: does not exist.*training entry 1"):
        discover_cases(site)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"training": [', "is not valid JSON"),
        ('{"training": {"image": "a"}}', "'training' is not a list"),
        ('{"name": "x"}', "has no 'training' list"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"training": [{"image": "./imagesTr/a.png"}]}', "training entry 0 has no 'label'"),
        ('{"training": [{"label": "./labelsTr/a.png"}]}', "training entry 0 has no 'image'"),
        ('{"training": ["./imagesTr/a.png"]}', "training entry 0 is not an object"),
        (
            '{"training": [{"image": "./imagesTr/a.png", "label": "./labelsTr/a.png", '
            '"patient": [1]}]}',
            "invalid 'patient'",
        ),
    ],
)
def test_malformed_dataset_json(tmp_path: Path, text: str, problem: str) -> None:
    site = make_2d_site(tmp_path / "s", ["a"])
    (site / "dataset.json").write_text(text)
    with pytest.raises(DataError) as info:
        discover_cases(site)
    message = str(info.value)
    assert "dataset.json: " in message
    assert problem in message
    assert "\n" not in message


def test_patient_pattern_no_match(tmp_path: Path) -> None:
    site = make_2d_site(tmp_path / "s", ["pat1_a", "other"])
    with pytest.raises(DataError, match=r"other\.png: case id 'other' does not match"):
        discover_cases(site, r"^(pat\d+)_")


def test_truncated_nifti_in_load_case(tmp_path: Path) -> None:
    site = tmp_path / "mri"
    write_nifti(site / "imagesTr" / "v.nii.gz", np.ones((16, 16, 16), np.float32))
    path = write_nifti(site / "labelsTr" / "v.nii.gz", np.ones((16, 16, 16), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ref = discover_cases(site)[0]
    with pytest.raises(DataError, match=r"labelsTr/v\.nii\.gz: cannot be read as NIfTI"):
        load_case(ref, 1, 2, 3)


def test_label_shape_mismatch(tmp_path: Path) -> None:
    site = tmp_path / "s"
    write_png(site / "imagesTr" / "a.png", rgb(12, 10))
    write_png(site / "labelsTr" / "a.png", vessel_mask(10, 12))
    with pytest.raises(DataError) as info:
        load_case(discover_cases(site)[0], 1, 2, 2)
    message = str(info.value)
    assert "labelsTr/a.png: " in message
    assert "(10, 12)" in message and "(12, 10)" in message


def test_label_rank_mismatch(tmp_path: Path) -> None:
    site = tmp_path / "s"
    write_nifti(site / "imagesTr" / "a.nii.gz", np.ones((6, 5, 4), np.float32))
    write_nifti(site / "labelsTr" / "a.nii.gz", np.ones((6, 5), np.uint8))
    with pytest.raises(DataError, match=r"labelsTr/a\.nii\.gz: .*\(6, 5\).*\(6, 5, 4\)"):
        load_case(discover_cases(site)[0], 1, 2, 3)


def test_nan_in_image(tmp_path: Path) -> None:
    site = tmp_path / "s"
    volume = np.ones((6, 5, 4), np.float32)
    volume[1, 2, 3] = np.nan
    volume[0, 0, 0] = np.inf
    write_nifti(site / "imagesTr" / "bad.nii.gz", volume)
    write_nifti(site / "labelsTr" / "bad.nii.gz", np.zeros((6, 5, 4), np.uint8))
    with pytest.raises(DataError, match=r"bad\.nii\.gz: contains 2 NaN or infinite"):
        load_case(discover_cases(site)[0], 1, 2, 3)


def test_2d_image_for_3d_model(tmp_path: Path) -> None:
    site = make_2d_site(tmp_path / "s", ["flat"])
    with pytest.raises(DataError, match=r"flat\.png: is a 2D image .* model is 3D"):
        load_case(discover_cases(site)[0], 1, 2, 3)


def test_3d_image_for_2d_model(tmp_path: Path) -> None:
    site = tmp_path / "s"
    write_nifti(site / "imagesTr" / "vol.nii.gz", np.ones((6, 5, 4), np.float32))
    write_nifti(site / "labelsTr" / "vol.nii.gz", np.zeros((6, 5, 4), np.uint8))
    with pytest.raises(DataError, match=r"vol\.nii\.gz: is a 3D image .* model is 2D"):
        load_case(discover_cases(site)[0], 1, 2, 2)
    with pytest.raises(DataError, match=r"vol\.nii\.gz: is a 3D image"):
        load_image_for_inference(site / "imagesTr" / "vol.nii.gz", 1, 2)


def test_label_out_of_range_multiclass(tmp_path: Path) -> None:
    site = tmp_path / "s"
    write_png(site / "imagesTr" / "a.png", rgb())
    write_png(site / "labelsTr" / "a.png", vessel_mask())  # {0, 255}
    with pytest.raises(DataError, match=r"labelsTr/a\.png: .*255 outside \[0, 4\)"):
        load_case(discover_cases(site)[0], 1, 4, 2)


def test_rgb_label_with_different_channels(tmp_path: Path) -> None:
    site = tmp_path / "s"
    write_png(site / "imagesTr" / "a.png", rgb())
    write_png(site / "labelsTr" / "a.png", rgb(seed=5))
    with pytest.raises(DataError, match=r"labelsTr/a\.png: is a colour label"):
        load_case(discover_cases(site)[0], 1, 2, 2)


def test_channel_mismatch_in_load_case(tmp_path: Path) -> None:
    site = make_2d_site(tmp_path / "s", ["a"])
    with pytest.raises(DataError, match=r"imagesTr/a\.png: has 3 channels"):
        load_case(discover_cases(site)[0], 2, 2, 2)
