"""Planned resampling of a decoded case (MONAI), for training, validation and prediction.

Applied identically in training, validation and prediction, so a model only
ever sees images prepared the way it was trained on. Dice and masks are always
produced at the image's own resolution: logits are resampled back, never the
reference label.

:func:`prepared_case` keeps a site's cases prepared (read, checked, normalised,
resampled) in its disk cache, so a new process gets them without decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Resize
from torch.nn import functional

from client import case_cache
from client.data_contract import CaseRef, LoadedCase, load_case
from client.imaging import read_image
from shared.config import ModelSpec


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


#: Cases prepared (read, checked, normalised, resampled) by this process; a case
#: found in the site's disk cache is not counted.
PREPARED = 0
# The code a prepared case depends on: a change to any of them prepares cases again.
_CODE = ("client.imaging", "client.transforms", "client.data_contract",
         "shared.normalization", "shared.planning", __name__)  # planning: working_size


def prepared_case(ref: CaseRef, spec: ModelSpec, cache: Path | None, *,
                  working: bool) -> LoadedCase:
    """Return a case as :func:`~client.data_contract.load_case` prepares it, resampled.

    Parameters
    ----------
    ref : CaseRef
        The case.
    spec : ModelSpec
        Its in-channels, classes, dimensions and normalisation apply.
    cache : pathlib.Path or None
        The site's disk cache (:mod:`client.case_cache`). A case prepared before
        from the same two files, settings and code is read from there (only its
        image file's decoded array besides); otherwise it is prepared and stored.
        Only cases that passed every check are stored, so a hit skips nothing
        that could fail now.
    working : bool
        Resample image and label to the network's working size
        (:meth:`~shared.config.ModelSpec.working_size`: the planned ``resize`` or
        ``downsample``), as training cases are; ``False`` keeps the case's own size,
        as validation cases do.

    Raises
    ------
    DataError
        The case breaks the data contract (never cached, so raised every time).
    """
    if cache is None:
        return _prepare(ref, spec, working, None)
    resampling = [list(spec.resize), list(spec.downsample)] if working else []
    name: list[object] = [str(ref.image.resolve()), str(ref.label.resolve()), spec.in_channels,
                          spec.num_classes, spec.spatial_dims, spec.normalization, resampling]
    # Taken before reading: a file changed meanwhile has another identity next time.
    identity = [*case_cache.file_identity(ref.image), *case_cache.file_identity(ref.label),
                case_cache.code_version(*_CODE)]
    entry = case_cache.load(cache, "cases", name, identity, ["image", "label"])
    if entry is not None and _fits(entry, spec):
        return LoadedCase(case_id=ref.case_id, patient_id=ref.patient_id, image=entry["image"],
                          label=entry["label"].astype(np.int64),
                          source=read_image(ref.image, cache))
    case = _prepare(ref, spec, working, cache)
    # Class indices lie below num-classes: store them in the smallest type that holds them.
    label = case.label.astype(np.min_scalar_type(spec.num_classes - 1))
    case_cache.store(cache, "cases", name, identity, {"image": case.image, "label": label})
    return case


def _prepare(ref: CaseRef, spec: ModelSpec, working: bool,
             cache: Path | None) -> LoadedCase:
    global PREPARED
    case = load_case(ref, spec.in_channels, spec.num_classes, spec.spatial_dims,
                     spec.normalization, cache)
    PREPARED += 1
    size = spec.working_size(case.image.shape[1:]) if working else ()
    if not size:
        return case
    return replace(case, image=resize_image(case.image, size),
                   label=resize_label(case.label, size, spec.num_classes))


def _fits(entry: dict[str, np.ndarray], spec: ModelSpec) -> bool:
    image, label = entry["image"], entry["label"]
    return (image.dtype == np.float32 and image.ndim == spec.spatial_dims + 1
            and image.shape[0] == spec.in_channels and label.shape == image.shape[1:]
            and np.issubdtype(label.dtype, np.integer))
