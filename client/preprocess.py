"""Planned resampling of a decoded case (MONAI), for training, validation and prediction.

Applied identically in training, validation and prediction, so a model only
ever sees images prepared the way it was trained on. Dice and masks are always
produced at the image's own resolution: logits are resampled back, never the
reference label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Resize
from torch.nn import functional


def resize_image(image_cf: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resample a channel-first image to ``size`` by area averaging (MONAI ``Resize``)."""
    if tuple(image_cf.shape[1:]) == tuple(size):
        return image_cf
    resized = Resize(tuple(size), mode="area")(torch.from_numpy(np.ascontiguousarray(image_cf)))
    return np.asarray(resized, dtype=np.float32)


def resize_label(label: np.ndarray, size: Sequence[int], num_classes: int) -> np.ndarray:
    """Resample a class map to ``size``: area-averaged one-hot, then the majority class."""
    if tuple(label.shape) == tuple(size):
        return label
    onehot = np.stack([(label == k).astype(np.float32) for k in range(num_classes)])
    shares = np.asarray(Resize(tuple(size), mode="area")(torch.from_numpy(onehot)))
    return np.ascontiguousarray(shares.argmax(axis=0).astype(np.int64))


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample ``(B, K, *spatial)`` logits to ``size`` (bi- or trilinear)."""
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    mode = "bilinear" if logits.ndim == 4 else "trilinear"
    return functional.interpolate(logits, size=tuple(size), mode=mode, align_corners=False)
