"""Intensity normalisation schemes: pure NumPy, one registry entry per scheme.

The scheme is part of the model's input contract (a ``model-*`` key of the round
config and of every checkpoint), so training, validation and prediction prepare
an image the same way at every site.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared.registry import Registry

#: Voxels within this share of the intensity range above the minimum are "dark".
DARK_LEVEL = 0.05


def dark_mask(image_cf: np.ndarray) -> np.ndarray:
    """Return the voxels near the image's minimum (the frame around a fundus photograph).

    The threshold is relative to the minimum and the 99th percentile of the
    channel mean, so it is the same before and after a linear intensity change.
    """
    grey = image_cf.astype(np.float64).mean(axis=0)
    low, high = float(grey.min()), float(np.percentile(grey, 99))
    if high <= low:
        return np.zeros(grey.shape, dtype=bool)
    return np.asarray(grey <= low + DARK_LEVEL * (high - low))


def _zscore_inside(image_cf: np.ndarray, inside: np.ndarray) -> np.ndarray:
    if not inside.any():
        inside = np.ones(image_cf.shape[1:], dtype=bool)
    out = np.zeros(image_cf.shape, dtype=np.float32)
    for c in range(image_cf.shape[0]):
        values = image_cf[c][inside].astype(np.float64)
        std = values.std()
        if std == 0:
            continue
        out[c] = np.where(inside, (image_cf[c] - values.mean()) / std, 0.0)
    return out


def zscore(image_cf: np.ndarray) -> np.ndarray:
    """Z-score each channel over every voxel; a constant channel becomes zeros."""
    return _zscore_inside(image_cf, np.ones(image_cf.shape[1:], dtype=bool))


def zscore_fov(image_cf: np.ndarray) -> np.ndarray:
    """Z-score each channel over the field of view only; the dark frame becomes 0.

    The frame's share differs between cameras (CHASE_DB1's is twice DRIVE's) and
    would otherwise shift every site's intensities differently.
    """
    return _zscore_inside(image_cf, ~dark_mask(image_cf))


@dataclass(frozen=True)
class Normalization:
    """One normalisation scheme: the function, and its rule in words.

    The words go into an exported model's input contract, where a deployment
    re-implements the rule in its own language, so they must say exactly what
    ``apply`` does.
    """

    apply: Callable[[np.ndarray], np.ndarray]
    description: str


NORMALIZATIONS: Registry[Normalization] = Registry("normalization", {
    "zscore": Normalization(zscore, (
        "per-channel z-score over the whole image (not per window): for each channel c, "
        "x_c = (x_c - mean(x_c)) / std(x_c) with the population standard deviation, computed "
        "in float64 and cast to float32; a constant channel becomes all zeros")),
    "zscore-fov": Normalization(zscore_fov, (
        "per-channel z-score over the field of view only: a voxel whose channel mean is at "
        "most min + 0.05 * (p99 - min) of that channel mean is the dark frame; mean and "
        "population standard deviation of each channel over the other voxels, computed in "
        "float64 and cast to float32; the frame becomes 0")),
})


def normalize(image_cf: np.ndarray, scheme: str) -> np.ndarray:
    """Return ``image_cf`` (``(C, *spatial)``) normalised by ``scheme`` as float32."""
    return NORMALIZATIONS[scheme].apply(image_cf)
