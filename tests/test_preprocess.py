"""Planned preprocessing on hand-made arrays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client.preprocess import resize_image, resize_label, resize_logits
from shared.config import ModelSpec
from shared.normalization import dark_mask, normalize
from shared.planning import working_size


def _fundus() -> np.ndarray:
    image = np.zeros((1, 4, 4))
    image[0, 1:3, 1:3] = [[10.0, 20.0], [30.0, 40.0]]  # field of view; the rest is frame
    return image


def test_fov_zscore_uses_only_the_field_of_view() -> None:
    out = normalize(_fundus(), "zscore-fov")
    inside = np.array([10.0, 20.0, 30.0, 40.0])
    expected = (inside - inside.mean()) / inside.std()
    assert out[0, 1:3, 1:3].ravel() == pytest.approx(expected, abs=1e-6)
    assert np.count_nonzero(out[0]) == 4          # the frame is exactly 0
    assert dark_mask(_fundus()).sum() == 12


def test_plain_zscore_counts_the_frame() -> None:
    out = normalize(_fundus(), "zscore")
    assert out.mean() == pytest.approx(0.0, abs=1e-6)
    assert out.std() == pytest.approx(1.0, abs=1e-5)
    assert out.dtype == np.float32


def test_fov_normalisation_ignores_how_much_frame_a_camera_adds() -> None:
    small = normalize(_fundus(), "zscore-fov")
    wide = np.pad(_fundus(), ((0, 0), (3, 3), (3, 3)))
    assert normalize(wide, "zscore-fov")[0, 4:6, 4:6] == pytest.approx(small[0, 1:3, 1:3])


def test_resize_by_area_and_majority_label() -> None:
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    assert resize_image(image, (2, 2))[0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    label = np.zeros((4, 4), dtype=np.int64)
    label[:2, :2] = 1
    label[0, 2] = 1                               # one of four pixels: stays background
    assert resize_label(label, (2, 2), 2).tolist() == [[1, 0], [0, 0]]
    logits = torch.zeros(1, 2, 2, 2)
    assert tuple(resize_logits(logits, (5, 7)).shape) == (1, 2, 5, 7)


def test_a_constant_patch_does_not_fill_the_site_log_with_histogram_warnings() -> None:
    # In a fresh interpreter with every warning shown: the training pipeline's import
    # silences MONAI's one-intensity notice, and only it.
    code = (
        "import warnings\n"
        "import numpy as np\n"
        "import client.augment\n"
        "from monai.transforms import RandHistogramShift\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    RandHistogramShift(num_control_points=8, prob=1.0)(np.zeros((1, 8, 8), 'float32'))\n"
        "    warnings.warn('another warning', UserWarning)\n"
        "print([str(w.message) for w in seen])\n"
    )
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "['another warning']"


def test_working_size_is_a_fixed_resize_or_each_cases_own_size_over_whole_factors() -> None:
    assert working_size((101, 77, 9), (), (2, 2, 1)) == (51, 39, 9)  # ceil: no side is lost
    assert working_size((1, 2), (), (4, 4)) == (1, 1)
    assert working_size((101, 77), (64, 64), ()) == (64, 64)
    assert working_size((101, 77), (), ()) == ()
    spec = ModelSpec(channels=(4, 8), patch_size=(8, 8, 8), downsample=(2, 2, 1))
    assert spec.working_size((20, 18, 5)) == (10, 9, 5)
    assert spec.working_size((21, 17, 5)) == (11, 9, 5)
