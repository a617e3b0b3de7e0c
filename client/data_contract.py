"""A site's data contract: finding its cases, splitting them, loading one case.

A site folder uses the Medical Segmentation Decathlon layout::

    site/
      dataset.json        optional: {"training": [{"image": "./imagesTr/a.png",
                                                   "label": "./labelsTr/a.png"}, ...]}
      imagesTr/a.png      NIfTI (.nii.gz, .nii), PNG or JPEG
      labelsTr/a.png

Without ``dataset.json`` images and labels are paired by file name without suffix
(``chase_01L.jpg`` with ``chase_01L.png``); an nnU-Net style ``case_0000.nii.gz``
image pairs with ``case.nii.gz``. Every problem is a one-line
:class:`~shared.errors.DataError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.config import patient_pattern_problem
from client.imaging import (
    SUFFIX_LIST,
    SUFFIXES,
    ImageFile,
    is_image_file,
    read_image,
    strip_suffix,
    unreadable_link,
)
from client.transforms import (
    label_to_single_channel,
    labels_to_classes,
    match_channels,
    refuse_compression_traces,
    refuse_copy_of_image,
    refuse_image_like_label,
    refuse_lossy_label,
    to_channel_first,
)
from shared.errors import DataError
from shared.normalization import normalize

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"

_LAYOUT = (
    "expected Decathlon layout: imagesTr/ and labelsTr/ with matching file names "
    f"({SUFFIX_LIST}), or a dataset.json whose 'training' list pairs them"
)
_JSON_FIX = (
    'it must hold {"training": [{"image": "./imagesTr/x.png", "label": "./labelsTr/x.png"}, '
    "...]}"
)
_NNUNET_CHANNEL = re.compile(r"(.+)_(\d{4})")
_LATERALITY = re.compile(r"(?<=\d)[_-]?(L|R|left|right)$", flags=re.IGNORECASE)


@dataclass(frozen=True)
class CaseRef:
    """One training case of a site, before reading.

    Attributes
    ----------
    case_id : str
        The image's file name without suffix (for nnU-Net ``x_0000`` images
        paired by name: ``x``). Unique within a site.
    patient_id : str
        The patient the case belongs to; a patient's cases never straddle the split.
    image, label : pathlib.Path
        The image and label files.

    """

    case_id: str
    patient_id: str
    image: Path
    label: Path


@dataclass(frozen=True, eq=False)
class LoadedCase:
    """One case read, validated and ready for training or evaluation.

    Attributes
    ----------
    case_id, patient_id : str
        As in :class:`CaseRef`.
    image : numpy.ndarray
        float32 ``(in_channels, *spatial)``, z-score normalised per channel.
    label : numpy.ndarray
        int64 ``(*spatial)`` class indices in ``[0, num_classes)``.
    source : ImageFile
        The image as read (affine, header and format for writing predictions).

    """

    case_id: str
    patient_id: str
    image: np.ndarray
    label: np.ndarray
    source: ImageFile


def discover_cases(site_dir: Path, patient_pattern: str = "") -> list[CaseRef]:
    """List a site's training cases, sorted by case id.

    Parameters
    ----------
    site_dir : pathlib.Path
        The site folder (Decathlon layout, see the module docstring).
    patient_pattern : str, optional
        Regular expression whose first group, searched in the case id, is the
        patient id. Unused for ``dataset.json`` entries with a ``"patient"``
        field. Without it a trailing laterality marker after a digit is dropped
        (``chase_01L`` and ``chase_01R`` are patient ``chase_01``).

    Returns
    -------
    list of CaseRef
        At least one case; every image and label file exists.

    Raises
    ------
    DataError
        The folder is missing or holds no cases, ``dataset.json`` is malformed or
        names a missing file, an image has no label, two images share a case id,
        or a case id does not match ``patient_pattern``.

    """
    site_dir = Path(site_dir).expanduser()
    if not site_dir.exists():
        raise DataError(
            site_dir, "site folder does not exist", "set data-path to the site's folder"
        )
    if not site_dir.is_dir():
        raise DataError(site_dir, "is not a folder", "set data-path to the site's folder")
    pattern = _compile_pattern(site_dir, patient_pattern)
    json_path = site_dir / DATASET_JSON
    if json_path.exists():
        triples = _from_dataset_json(site_dir, json_path)
    else:
        triples = _from_folders(site_dir)
    if not triples:
        raise DataError(site_dir, "site folder contains no cases", _LAYOUT)
    cases: dict[str, CaseRef] = {}
    for case_id, image, label, patient in triples:
        if case_id in cases:
            raise DataError(
                image,
                f"has the same case id {case_id!r} as {cases[case_id].image.name}",
                "give every image a distinct file name (one file per case, channels in one file)",
            )
        if patient is None:
            patient = _patient_id(case_id, image, pattern)
        cases[case_id] = CaseRef(case_id=case_id, patient_id=patient, image=image, label=label)
    return [cases[k] for k in sorted(cases)]


def _compile_pattern(site_dir: Path, patient_pattern: str) -> re.Pattern[str] | None:
    if not patient_pattern:
        return None
    problem = patient_pattern_problem(patient_pattern)
    if problem is not None:
        raise DataError(site_dir, f"patient-pattern {patient_pattern!r} {problem}",
                        "fix patient-pattern in the node config")
    return re.compile(patient_pattern)


def _patient_id(case_id: str, image: Path, pattern: re.Pattern[str] | None) -> str:
    if pattern is None:
        return _LATERALITY.sub("", case_id)
    match = pattern.search(case_id)
    if match is None or not match.group(1):
        raise DataError(
            image,
            f"case id {case_id!r} does not match patient-pattern {pattern.pattern!r}",
            "change patient-pattern so that its first group captures the patient id "
            "of every file name",
        )
    return match.group(1)


_Triple = tuple[str, Path, Path, str | None]


def _from_dataset_json(site_dir: Path, json_path: Path) -> list[_Triple]:
    try:
        data: Any = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            json_path, f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            _JSON_FIX,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        problem = " ".join(str(exc).split())
        raise DataError(json_path, f"cannot be read ({problem})", _JSON_FIX) from None
    if not isinstance(data, dict):
        raise DataError(json_path, "must hold a JSON object", _JSON_FIX)
    training = data.get("training")
    if not isinstance(training, list):
        problem = "has no 'training' list" if training is None else "'training' is not a list"
        raise DataError(json_path, problem, _JSON_FIX)
    triples: list[_Triple] = []
    for index, entry in enumerate(training):
        where = f"training entry {index}"
        if not isinstance(entry, dict):
            raise DataError(json_path, f"{where} is not an object with image and label", _JSON_FIX)
        paths: list[Path] = []
        for key in ("image", "label"):
            value = entry.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataError(json_path, f"{where} has no {key!r} path", _JSON_FIX)
            path = site_dir / value.strip()
            link = unreadable_link(path)
            if link:
                raise DataError(
                    path, f"{link} but is the {key} of {where} in {json_path.name}",
                    "point the link at the real file or replace it by the file",
                )
            if not path.is_file():
                raise DataError(
                    path,
                    f"does not exist but is the {key} of {where} in {json_path.name}",
                    f"add the file or fix the path in {json_path}",
                )
            paths.append(path)
        patient = entry.get("patient")
        if patient is not None:
            if isinstance(patient, bool) or not isinstance(patient, str | int) or patient == "":
                raise DataError(
                    json_path, f"{where} has an invalid 'patient' {patient!r}",
                    "make it a non-empty string or leave it out",
                )
            patient = str(patient)
        triples.append((strip_suffix(paths[0].name), paths[0], paths[1], patient))
    return triples


def _from_folders(site_dir: Path) -> list[_Triple]:
    images_dir = site_dir / IMAGES_DIR
    labels_dir = site_dir / LABELS_DIR
    for folder in (images_dir, labels_dir):
        _refuse_unreadable_link(folder)
    if not images_dir.is_dir():
        problem = f"site folder contains no cases: no {IMAGES_DIR}/ and no {DATASET_JSON}"
        raise DataError(site_dir, problem, _LAYOUT)
    labels: dict[str, Path] = {}
    if labels_dir.is_dir():
        for path in sorted(labels_dir.iterdir()):
            _refuse_unreadable_link(path)
            if not is_image_file(path):
                continue
            stem = strip_suffix(path.name)
            if stem in labels:
                raise DataError(
                    path, f"has the same name as {labels[stem].name}",
                    "keep one label file per case",
                )
            labels[stem] = path
    triples: list[_Triple] = []
    for image in sorted(images_dir.iterdir()):
        _refuse_unreadable_link(image)
        if not is_image_file(image):
            continue
        stem = strip_suffix(image.name)
        case_id = stem
        label = labels.get(stem)
        nnunet = _NNUNET_CHANNEL.fullmatch(stem)
        if label is None and nnunet is not None and nnunet.group(1) in labels:
            case_id = nnunet.group(1)
            label = labels[case_id]
        if label is None:
            raise DataError(
                image,
                f"has no label: no file named {stem} ({SUFFIX_LIST}) in {labels_dir}",
                "add its label with the same name or remove the image",
            )
        triples.append((case_id, image, label, None))
    return triples


def _refuse_unreadable_link(path: Path) -> None:
    """Name a dangling or looping link instead of skipping it as "not a file".

    Only names that would be read (visible, image suffix, or the two folders) are
    checked, so an unrelated broken link beside the data does not stop a site.
    """
    name = path.name
    relevant = name in (IMAGES_DIR, LABELS_DIR) or (
        not name.startswith(".") and name.lower().endswith(SUFFIXES)
    )
    problem = unreadable_link(path) if relevant else ""
    if problem:
        raise DataError(path, problem, "point the link at the real file or remove it")


def split_cases(
    cases: Sequence[CaseRef], val_fraction: float
) -> tuple[list[CaseRef], list[CaseRef]]:
    """Split cases into training and validation by patient, deterministically.

    Patients are ordered by the SHA-256 of their id; the first
    ``max(1, round(val_fraction * n_patients))`` (at most all but one) go to
    validation. The result does not depend on the order of ``cases``.

    Parameters
    ----------
    cases : sequence of CaseRef
        A site's cases.
    val_fraction : float
        Share of patients held out, in [0, 1); 0 keeps every case for training.

    Returns
    -------
    tuple of (list of CaseRef, list of CaseRef)
        ``(train, val)``, each sorted by case id; no patient is in both.

    Raises
    ------
    DataError
        ``val_fraction > 0`` but the site has fewer than 2 patients.
    ValueError
        ``val_fraction`` is outside [0, 1).

    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(cases, key=lambda c: c.case_id)
    if val_fraction == 0.0 or not ordered:
        return ordered, []
    patients = sorted(
        {c.patient_id for c in ordered},
        key=lambda p: (hashlib.sha256(p.encode()).hexdigest(), p),
    )
    if len(patients) < 2:
        site = ordered[0].image.parent.parent
        raise DataError(
            site,
            f"validation needs at least 2 patients but the site has 1 ({patients[0]!r}, "
            f"{len(ordered)} case(s))",
            "set val-fraction to 0 to train on every case without validation",
        )
    n_val = min(max(1, round(val_fraction * len(patients))), len(patients) - 1)
    val_patients = set(patients[:n_val])
    train = [c for c in ordered if c.patient_id not in val_patients]
    val = [c for c in ordered if c.patient_id in val_patients]
    return train, val


def _spatial_rank(image: ImageFile) -> int:
    """Return 2 or 3: the spatial dimensionality of an image as stored.

    PNG/JPEG are 2D. NIfTI follows the standard: axes 1-3 are spatial, so a
    volume is 3D unless its third axis has length 1.
    """
    shape = image.array.shape
    if image.fmt != "nifti" or len(shape) < 3 or shape[2] == 1:
        return 2
    return 3


def _image_channel_first(
    source: ImageFile, path: Path, in_channels: int, spatial_dims: int,
    normalization: str = "zscore",
) -> np.ndarray:
    rank = _spatial_rank(source)
    if rank != spatial_dims:
        raise DataError(
            path,
            f"is a {rank}D image (shape {source.array.shape}) but the model is {spatial_dims}D",
            f"use {spatial_dims}D images at this site or a {rank}-value patch-size",
        )
    array = source.array
    if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
        raise DataError(path, f"has non-numeric voxel type {array.dtype}", "store numbers")
    if np.issubdtype(array.dtype, np.inexact):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise DataError(
                path,
                f"contains {bad} NaN or infinite value(s)",
                "replace them (for example with 0) or remove the case",
            )
    _refuse_undeclared_series(source, path, in_channels)
    image_cf = to_channel_first(array, spatial_dims, path)
    image_cf = match_channels(image_cf, in_channels, path)
    return normalize(image_cf, normalization)


def _refuse_undeclared_series(source: ImageFile, path: Path, in_channels: int) -> None:
    """Refuse a 4D NIfTI whose 4th axis the model was not told to take as channels.

    NIfTI's 4th axis is time (components sit on the 5th), so ``X x Y x Z x 3``
    may be three time points; read as channels they would be averaged like RGB.
    Only ``in-channels`` equal to that axis says they are channels.
    """
    shape = source.array.shape
    if source.fmt != "nifti" or len(shape) != 4 or shape[3] == 1 or shape[3] == in_channels:
        return
    count = shape[3]
    raise DataError(
        path,
        f"is a 4D series of {count} volumes (shape {shape}) but the model takes in-channels "
        f"= {in_channels}, so they would be averaged as if they were colours",
        f"if the {count} volumes are channels (e.g. MRI sequences) set in-channels = {count}; "
        "if they are time points, store one volume per case",
    )


def _check_args(in_channels: int, spatial_dims: int, num_classes: int = 2) -> None:
    if spatial_dims not in (2, 3) or in_channels < 1 or num_classes < 2:
        raise ValueError(
            f"need spatial_dims 2 or 3, in_channels >= 1, num_classes >= 2; got "
            f"{spatial_dims}, {in_channels}, {num_classes}"
        )


def load_image_for_inference(
    path: Path, in_channels: int, spatial_dims: int, normalization: str = "zscore",
    cache: Path | None = None,
) -> tuple[np.ndarray, ImageFile]:
    """Read and prepare one image exactly as :func:`load_case` does, without a label.

    ``normalization`` names a scheme of :data:`shared.normalization.NORMALIZATIONS`;
    ``cache`` is a site's disk cache of decoded files (see :func:`~client.imaging.read_image`).

    Returns
    -------
    tuple of (numpy.ndarray, ImageFile)
        The float32 ``(in_channels, *spatial)`` normalised image and the file as read.

    Raises
    ------
    DataError
        The file cannot be read, holds NaN/inf, has the wrong dimensionality, or
        its channels cannot be matched to ``in_channels``.

    """
    _check_args(in_channels, spatial_dims)
    path = Path(path)
    source = read_image(path, cache)
    return _image_channel_first(source, path, in_channels, spatial_dims, normalization), source


def load_case(ref: CaseRef, in_channels: int, num_classes: int, spatial_dims: int,
              normalization: str = "zscore", cache: Path | None = None) -> LoadedCase:
    """Read, validate and prepare one case.

    Parameters
    ----------
    ref : CaseRef
        The case, as found by :func:`discover_cases`.
    in_channels : int
        Channels the model expects (see :func:`~client.transforms.match_channels`).
    num_classes : int
        Classes including background; 2 binarises the label
        (see :func:`~client.transforms.labels_to_classes`).
    spatial_dims : int
        2 or 3; must match the image.
    normalization : str
        Intensity scheme (:data:`shared.normalization.NORMALIZATIONS`).
    cache : pathlib.Path, optional
        A site's disk cache of decoded files (see :func:`~client.imaging.read_image`).

    Returns
    -------
    LoadedCase
        Normalised float32 channel-first image and int64 label of equal spatial shape.

    Raises
    ------
    DataError
        Any problem with the image or label file, naming that file.

    """
    _check_args(in_channels, spatial_dims, num_classes)
    image_cf, source = load_image_for_inference(ref.image, in_channels, spatial_dims,
                                                normalization, cache)
    label_file = read_image(ref.label, cache)
    refuse_lossy_label(label_file.fmt, ref.label)
    refuse_copy_of_image(label_file.array, source.array, ref.label, ref.image.name)
    spatial = image_cf.shape[1:]
    label_rank = _spatial_rank(label_file)
    if label_rank != spatial_dims:
        raise _shape_mismatch(ref, label_file.array.shape, spatial)
    label_cf = to_channel_first(label_file.array, spatial_dims, ref.label)
    if label_cf.shape[1:] != spatial:
        raise _shape_mismatch(ref, label_cf.shape[1:], spatial)
    label = label_to_single_channel(label_cf, ref.label)
    refuse_image_like_label(label, image_cf, ref.label, ref.image.name)
    refuse_compression_traces(label, num_classes, ref.label)
    classes = labels_to_classes(label, num_classes, ref.label)
    return LoadedCase(
        case_id=ref.case_id,
        patient_id=ref.patient_id,
        image=image_cf,
        label=np.ascontiguousarray(classes),
        source=source,
    )


def _shape_mismatch(
    ref: CaseRef, label_shape: tuple[int, ...], spatial: tuple[int, ...]
) -> DataError:
    return DataError(
        ref.label,
        f"label has spatial shape {tuple(label_shape)} but its image {ref.image.name} has "
        f"{tuple(spatial)}",
        "a label must have exactly the size of its image",
    )


def declared_channels(site_dir: Path) -> int:
    """Return how many image channels the site's ``dataset.json`` names (0: none).

    Decathlon's ``"modality"`` and nnU-Net v2's ``"channel_names"`` map each
    channel's index to its name (``{"0": "T2", "1": "ADC"}``). That declares a 4D
    NIfTI's 4th axis of as many volumes to be channels (MRI sequences), not time
    points. A missing or unreadable file names none: :func:`discover_cases`
    reports what is wrong with it.
    """
    path = site_dir / DATASET_JSON
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return 0
    names = data.get("modality", data.get("channel_names")) if isinstance(data, dict) else None
    return len(names) if isinstance(names, dict) else 0


def read_raw_case(ref: CaseRef, cache: Path | None = None, series_channels: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Return a case as stored, for statistics: raw ``(C, *spatial)`` image, label, spacing.

    Nothing is normalised or resampled; an alpha channel is dropped. The label is
    its single channel with the values as stored (class codes, 0/255 or a soft
    mask). Used by the data fingerprint.
    ``cache`` is a site's disk cache of decoded files (see :func:`~client.imaging.read_image`).
    A 4D NIfTI's volumes are its channels only when they are ``series_channels``
    (:func:`declared_channels`); otherwise the first stands for the case, so that
    the plan does not declare a time series to be channels (the contract then
    asks for ``in-channels``).

    Raises
    ------
    DataError
        The image or label cannot be read or does not fit the contract.
    """
    source = read_image(ref.image, cache)
    rank = _spatial_rank(source)
    raw = to_channel_first(source.array, rank, ref.image)
    series = source.fmt == "nifti" and source.array.ndim == 4 and source.array.shape[3] > 1
    raw = (raw if raw.shape[0] == series_channels else raw[:1]) if series else raw[:3]
    label_file = read_image(ref.label, cache)
    label = label_to_single_channel(to_channel_first(label_file.array, rank, ref.label),
                                    ref.label)
    if label.shape != raw.shape[1:]:
        raise _shape_mismatch(ref, label.shape, raw.shape[1:])
    return raw, np.asarray(label), tuple(float(v) for v in source.spacing[:rank])


def site_split(site_dir: Path, patient_pattern: str, val_fraction: float
               ) -> tuple[list[CaseRef], list[CaseRef]]:
    """Return a site's training and validation cases, refusing a site with no training case.

    Raises
    ------
    DataError
        No case is left for training after the validation split.
    """
    train, val = split_cases(discover_cases(site_dir, patient_pattern), val_fraction)
    if not train:
        raise DataError(site_dir, "no training cases left after the validation split",
                        "lower val-fraction or add cases")
    return train, val
