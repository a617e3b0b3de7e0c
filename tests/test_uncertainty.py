"""``fedseg predict --uncertainty``: flip test-time augmentation, uncertainty maps, the CSV."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from PIL import Image
from torch import nn

from client.config import SiteConfig
from client.data_contract import load_image_for_inference
from client.imaging import write_mask
from client.inference import (
    Tiling,
    flip_axes,
    normalized_entropy,
    predict_probabilities,
    predict_with_uncertainty,
    trained_flips,
)
from client.predict import (
    CSV_COLUMNS,
    OVER_STRUCTURE,
    OVER_WHOLE_IMAGE,
    UNCERTAINTY_CSV,
    Prediction,
    load_site_network,
    summarise_uncertainty,
    uncertainty_table,
)
from client.trainer import SiteTrainer
from fedseg.cli import EXIT_BAD_INPUT, main
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec, TrainPlan
from shared.networks import build_network
from shared.weights import state_to_numpy
from simulations.phantoms import write_synthetic_federation

CPU = torch.device("cpu")
SPEC_2D = ModelSpec(channels=(8, 16), patch_size=(16, 16), in_channels=3)
SPEC_3D = ModelSpec(channels=(8, 16), patch_size=(16, 16, 16))
AFFINE = np.array([[0.7, 0.1, 0.0, -12.5], [0.0, 0.8, 0.2, 30.25],
                   [0.05, 0.0, 1.5, 7.0], [0.0, 0.0, 0.0, 1.0]])


def model_file(tmp_path: Path, spec: ModelSpec) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "final_model.pt"
    Checkpoint(spec, state_to_numpy(build_network(spec).state_dict()), 1).save(path)
    return path


def predict(model: Path, images: Path, output: Path, *extra: str) -> int:
    return main(["predict", "--model", str(model), "--input", str(images), "--output",
                 str(output), "--device", "cpu", *extra])


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def png_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 35, 3), dtype=np.uint8)).save(path / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path / "b.jpg")
    return path


def nifti_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    volume = np.random.default_rng(0).random((20, 18, 12)).astype(np.float32)
    image = nib.Nifti1Image(volume, AFFINE)
    image.header.set_zooms((0.7, 0.8, 1.5))
    nib.save(image, path / "case.nii.gz")
    return path


# --- the method: flips inverted exactly, entropy normalised ---------------------------


class Pointwise(nn.Module):
    """Logits (0, 4 * x) per voxel: the same answer however the image is flipped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), 4 * x[:, :1]], dim=1)


@pytest.mark.parametrize("shape", [(23, 17), (13, 11, 9)])
def test_every_flip_is_inverted_onto_the_original_grid(shape: tuple[int, ...]) -> None:
    # An asymmetric ramp: a pass not flipped back would put its probabilities on the
    # mirrored voxels, and the average would differ from the single pass.
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    image = (sum(g * (k + 1) for k, g in enumerate(grids)) + 0.3)[None].astype(np.float32)
    tiling = Tiling((8,) * len(shape), flips=tuple(flip_axes(len(shape))))
    single = predict_probabilities(Pointwise(), image, tiling, CPU)
    result = predict_with_uncertainty(Pointwise(), image, tiling, CPU)
    assert result.passes == 2 ** len(shape)
    assert result.classes.shape == result.uncertainty.shape == shape
    np.testing.assert_array_equal(result.classes, single.argmax(dim=0).numpy())
    np.testing.assert_allclose(result.uncertainty, normalized_entropy(single).numpy(),
                               atol=1e-5)
    # Uncertain where the logits tie (image near 0), certain at the ends of the ramp.
    assert result.uncertainty.max() > 0.99 and result.uncertainty.min() < 0.01


def test_uncertainty_uses_only_the_flips_a_model_was_trained_on() -> None:
    patches = ModelSpec(channels=(8, 16), patch_size=(16, 16), test_time_flips=False)
    whole = replace(patches, resize=(16, 16))
    # Patch training flips every axis, whatever test-time-flips says about prediction.
    assert trained_flips(patches) == ((), (0,), (1,), (0, 1))
    # Whole resized images are never flipped in training (a chest has a left and a right).
    assert trained_flips(whole) == ((),)


def test_a_whole_image_model_gives_one_pass_and_the_plain_mask(tmp_path: Path) -> None:
    spec = ModelSpec(channels=(8, 16), patch_size=(16, 16), resize=(16, 16), in_channels=3)
    images = png_folder(tmp_path / "in")
    model = model_file(tmp_path, spec)
    assert predict(model, images, tmp_path / "plain") == 0
    assert predict(model, images, tmp_path / "tta", "--uncertainty") == 0
    for mask in ("a.png", "b.png"):
        assert (tmp_path / "tta" / mask).read_bytes() == (tmp_path / "plain" / mask).read_bytes()
    net = build_network(spec).eval()
    image = np.random.default_rng(1).random((3, 20, 24)).astype(np.float32)
    result = predict_with_uncertainty(net, image, Tiling.of(spec), CPU)
    single = predict_probabilities(net, image, Tiling.of(spec), CPU)
    assert result.passes == 1
    np.testing.assert_allclose(result.uncertainty, normalized_entropy(single).numpy(), atol=1e-6)


def test_flip_combinations() -> None:
    assert flip_axes(2) == [(), (0,), (1,), (0, 1)]
    assert len(flip_axes(3)) == 8 and len(set(flip_axes(3))) == 8


def test_entropy_is_zero_when_certain_and_one_when_undecided() -> None:
    for k in (2, 3, 5):
        uniform = torch.full((k, 4, 4), 1.0 / k)
        onehot = torch.zeros((k, 4, 4))
        onehot[k - 1] = 1.0
        assert torch.allclose(normalized_entropy(uniform), torch.ones(4, 4))
        assert torch.equal(normalized_entropy(onehot), torch.zeros(4, 4))


def test_summary_of_an_empty_mask_is_over_the_whole_image(tmp_path: Path) -> None:
    uncertainty = np.array([[0.1, 0.2], [0.3, 0.6]], dtype=np.float32)
    empty = summarise_uncertainty(np.zeros((2, 2), np.int64), uncertainty, tmp_path / "e.png")
    assert not empty.over_structure and empty.structure_voxels == 0
    assert empty.mean == pytest.approx(0.3) and empty.max == pytest.approx(0.6)
    found = summarise_uncertainty(np.array([[0, 0], [1, 2]]), uncertainty, tmp_path / "f.png")
    assert found.over_structure and found.structure_voxels == 2
    assert found.mean == pytest.approx(0.45)
    rows = list(csv.DictReader(uncertainty_table([
        Prediction(tmp_path / "e.png", tmp_path / "out" / "e.png", empty),
        Prediction(tmp_path / "f.png", tmp_path / "out" / "f.png", found),
    ]).splitlines()))
    assert [r["image"] for r in rows] == [str(tmp_path / "f.png"), str(tmp_path / "e.png")]
    assert [r["mean_over"] for r in rows] == [OVER_STRUCTURE, OVER_WHOLE_IMAGE]


# --- fedseg predict --uncertainty on files ---------------------------------------------


def test_png_maps_have_the_image_size_and_the_csv_ranks_the_cases(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = png_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert predict(model_file(tmp_path, SPEC_2D), images, out, "--uncertainty") == 0
    stdout = capsys.readouterr().out
    assert "a_uncertainty.png" in stdout and str(out / UNCERTAINTY_CSV) in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "a.png", "a_uncertainty.png", "b.png", "b_uncertainty.png", UNCERTAINTY_CSV]
    rows = {Path(r["image"]).name: r for r in read_table(out / UNCERTAINTY_CSV)}
    means = [float(r["mean_uncertainty"]) for r in read_table(out / UNCERTAINTY_CSV)]
    assert means == sorted(means, reverse=True)
    for name, size in (("a.png", (40, 35)), ("b.jpg", (20, 24))):
        stem = name.split(".")[0]
        with Image.open(out / f"{stem}_uncertainty.png") as picture:
            assert picture.mode == "L"
            levels = np.asarray(picture)
        mask = np.asarray(Image.open(out / f"{stem}.png")) > 0
        assert levels.shape == mask.shape == size
        row = rows[name]
        assert (row["mask"], row["uncertainty_map"]) == (f"{stem}.png", f"{stem}_uncertainty.png")
        assert int(row["structure_voxels"]) == int(mask.sum())
        inside = levels[mask] if mask.any() else levels
        # The PNG holds the map in 1/255 steps; the CSV is computed before rounding.
        assert float(row["mean_uncertainty"]) == pytest.approx(inside.mean() / 255, abs=0.003)
        assert float(row["max_uncertainty"]) == pytest.approx(levels.max() / 255, abs=0.003)
        assert 0.0 <= float(row["mean_uncertainty"]) <= float(row["max_uncertainty"]) <= 1.0


def test_nifti_maps_keep_the_affine_and_header_exactly(tmp_path: Path) -> None:
    images = nifti_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert predict(model_file(tmp_path, SPEC_3D), images, out, "--uncertainty") == 0
    source = nib.load(images / "case.nii.gz")
    uncertainty = nib.load(out / "case_uncertainty.nii.gz")
    mask = nib.load(out / "case.nii.gz")
    for written in (uncertainty, mask):
        assert written.shape == source.shape
        assert np.array_equal(written.affine, source.affine)
        assert written.header.get_zooms() == source.header.get_zooms()
        assert np.array_equal(written.header.get_sform(), source.header.get_sform())
        assert np.array_equal(written.header.get_qform(), source.header.get_qform())
    values = np.asarray(uncertainty.dataobj)
    assert values.dtype == np.float32 and uncertainty.get_data_dtype() == np.float32
    assert values.min() >= 0.0 and 0.0 < values.max() <= 1.0
    (row,) = read_table(out / UNCERTAINTY_CSV)
    labels = np.asarray(mask.dataobj) > 0
    assert int(row["structure_voxels"]) == int(labels.sum())
    inside = values[labels] if labels.any() else values
    assert float(row["mean_uncertainty"]) == pytest.approx(float(inside.mean()), abs=1e-6)


def old_predict(model: Path, image: Path, spec: ModelSpec, target: Path) -> bytes:
    """The mask as `fedseg predict` wrote it before `--uncertainty` existed."""
    net = load_site_network(model, None).net.eval()
    array, source = load_image_for_inference(image, spec.in_channels, spec.spatial_dims,
                                             spec.normalization)
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(array)[None], spec.patch_size, 4,
                                          net, overlap=0.25, mode="gaussian")
    assert isinstance(logits, torch.Tensor)
    write_mask(logits.argmax(dim=1)[0].numpy(), source, target, num_classes=spec.num_classes)
    return target.read_bytes()


@pytest.mark.parametrize("dims", [2, 3])
def test_without_the_flag_nothing_new_is_written_and_masks_are_unchanged(
        tmp_path: Path, dims: int) -> None:
    # One pass, as the reference below (test-time flips are tested in test_inference).
    spec = replace(SPEC_2D if dims == 2 else SPEC_3D, test_time_flips=False)
    images = png_folder(tmp_path / "in") if dims == 2 else nifti_folder(tmp_path / "in")
    model = model_file(tmp_path, spec)
    out = tmp_path / "out"
    assert predict(model, images, out) == 0
    pairs = {"a.png": "a.png", "b.jpg": "b.png"} if dims == 2 else \
        {"case.nii.gz": "case.nii.gz"}
    assert sorted(p.name for p in out.iterdir()) == sorted(pairs.values())
    for image, mask in pairs.items():
        reference = old_predict(model, images / image, spec, tmp_path / f"old_{mask}")
        assert (out / mask).read_bytes() == reference, image


# --- refusals: an uncertainty map never replaces an image or another output ----------


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == EXIT_BAD_INPUT, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedseg: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_an_image_named_like_a_map_is_refused_before_writing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "in"
    images.mkdir()
    for name in ("a.png", "a_Uncertainty.jpg"):
        Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(images / name)
    model = model_file(tmp_path, SPEC_2D)
    code = predict(model, images, tmp_path / "out", "--uncertainty")
    one_line_error(code, capsys.readouterr().err, "a_Uncertainty.jpg", "a_Uncertainty.png",
                   "uncertainty map of a.png", "rename one")
    assert not (tmp_path / "out").exists()
    # Without maps the two names do not meet.
    assert predict(model, images, tmp_path / "out") == 0


def test_a_map_or_the_csv_that_is_an_input_image_through_a_link_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    images = png_folder(tmp_path / "in")
    model = model_file(tmp_path, SPEC_2D)
    for victim, needle in (("a_uncertainty.png", "uncertainty map would replace it"),
                           (UNCERTAINTY_CSV, "uncertainty summary would replace it")):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(out / victim, format="PNG")
        link = images / f"linked_{victim}.png"
        link.symlink_to(out / victim)
        before = (out / victim).read_bytes()
        code = predict(model, images, out, "--uncertainty")
        one_line_error(code, capsys.readouterr().err, victim, "through a link", needle)
        assert (out / victim).read_bytes() == before
        assert sorted(p.name for p in out.iterdir()) == [victim]
        link.unlink()
        (out / victim).unlink()


# --- the point of it: an unreliable input is flagged ----------------------------------


def test_a_noised_image_is_more_uncertain_than_the_clean_one(tmp_path: Path) -> None:
    # A tiny U-Net trained for a few dozen steps finds the synthetic organ; heavy noise
    # makes its flipped passes disagree and its softmax flatter. Fixed seeds throughout.
    site = write_synthetic_federation(tmp_path / "d", 1, 8, shape=(32, 32), seed=0)[0]
    spec = ModelSpec(channels=(8, 16), patch_size=(32, 32))
    trainer = SiteTrainer(SiteConfig(data_path=site, state_dir=tmp_path / "state",
                                     device="cpu", val_fraction=0.25), spec)
    trained = trainer.train(trainer.weights(),
                            TrainPlan(local_steps=40, batch_size=4, learning_rate=1e-2))
    model = tmp_path / "final_model.pt"
    Checkpoint(spec, trained.weights, 1).save(model)
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k, path in enumerate(sorted((site / "imagesTr").glob("*.png"))[:3]):
        clean = np.asarray(Image.open(path)).astype(np.float64)
        noised = np.clip(clean + rng.normal(0.0, 60.0, clean.shape), 0, 255)
        Image.fromarray(clean.astype(np.uint8)).save(images / f"c{k}_clean.png")
        Image.fromarray(noised.astype(np.uint8)).save(images / f"c{k}_noised.png")
    out = tmp_path / "out"
    assert predict(model, images, out, "--uncertainty") == 0
    rows = {Path(r["image"]).stem: float(r["mean_uncertainty"])
            for r in read_table(out / UNCERTAINTY_CSV)}

    def whole_image(stem: str) -> float:
        return float(np.asarray(Image.open(out / f"{stem}_uncertainty.png")).mean() / 255)

    for k in range(3):
        clean, noised = f"c{k}_clean", f"c{k}_noised"
        print(f"{clean}: structure {rows[clean]:.3f}, image {whole_image(clean):.3f}; "
              f"{noised}: structure {rows[noised]:.3f}, image {whole_image(noised):.3f}")
        assert rows[noised] > rows[clean] + 0.05
        assert whole_image(noised) > whole_image(clean) + 0.05
