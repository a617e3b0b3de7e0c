"""Reading and writing the image files a site holds: NIfTI, PNG and JPEG.

Every problem with a file (missing, unsupported, truncated, corrupt) is raised as a
one-line :class:`~shared.errors.DataError` naming the file; no exception from
nibabel, Pillow or zlib escapes.

Arrays are kept exactly as stored: PNG/JPEG as ``(row, col[, channel])`` and NIfTI
as ``(X, Y[, Z][, ...])`` in voxel order, without reorientation. :func:`write_mask`
and :func:`write_map` write in the same orientation, so reading a written mask gives
back the array.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from PIL import Image

from client import case_cache
from shared.atomic import write_atomic
from shared.errors import DataError

SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg")
"""File name endings of supported images (matched case-insensitively)."""

_FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
SUFFIX_LIST = ", ".join(SUFFIXES)
"""The supported suffixes as users read them in messages."""
_SUPPORTED = f"use {SUFFIX_LIST}"
_CORRUPT_FIX = "the file may be truncated or corrupt; copy or export it again"

# Everything nibabel, Pillow, gzip and zlib raise for a bad file. MemoryError covers
# a corrupt header that claims an absurd image size.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    zlib.error,
    struct.error,
    ValueError,
    ImageFileError,
    HeaderDataError,
    MemoryError,
    Image.DecompressionBombError,
)

# Pillow modes converted on reading so that an array is (H, W) or (H, W, 3|4).
_PIL_CONVERT = {"1": "L", "LA": "L", "La": "L", "PA": "P"}
_PIL_KEEP = ("L", "P", "RGB", "RGBA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True, eq=False)
class ImageFile:
    """One image file as read from disk.

    Attributes
    ----------
    array : numpy.ndarray
        Voxels in the stored dtype. PNG/JPEG: ``(H, W)`` or ``(H, W, C)`` with C in
        {3, 4}; palette PNGs keep their palette indices. NIfTI: ``(X, Y[, Z][, C])``
        in the file's voxel order (scaling from ``scl_slope`` applied).
    affine : numpy.ndarray
        4x4 float64 voxel-to-world matrix; identity for PNG/JPEG.
    spacing : tuple of float
        Voxel size per spatial axis; 1.0 for each axis of a PNG/JPEG.
    fmt : str
        ``"nifti"``, ``"png"`` or ``"jpeg"``.
    header : object or None
        The nibabel header of a NIfTI file (used to write masks), else None.

    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    fmt: str
    header: object | None


def _suffix(name: str) -> str:
    lower = name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return ""


def strip_suffix(name: str) -> str:
    """Return a file name without its image suffix.

    ``"chase_01L.jpg"`` gives ``"chase_01L"`` and ``"x.nii.gz"`` gives ``"x"``. A
    name without one of :data:`SUFFIXES` is returned unchanged.
    """
    suffix = _suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


def is_image_file(path: Path) -> bool:
    """Return True when ``path`` names a visible file with a supported image suffix."""
    return bool(_suffix(path.name)) and not path.name.startswith(".") and path.is_file()


def mask_name(image_name: str) -> str:
    """Return the file name of the mask of an image: NIfTI stays NIfTI, anything else PNG."""
    suffix = _suffix(image_name)
    keep = suffix if suffix and _FORMATS[suffix] == "nifti" else ".png"
    return strip_suffix(image_name) + keep


def unreadable_link(path: Path) -> str:
    """Return why ``path`` is a symbolic link that cannot be followed, or ``""``.

    A dangling link or a link loop looks like "no file" to :meth:`Path.is_file`,
    so a folder listing would drop such a case without a word; callers use this
    to name it instead.
    """
    if not path.is_symlink():
        return ""
    try:
        path.resolve(strict=True)
        os.stat(path)
    except (RuntimeError, OSError) as exc:
        target = os.readlink(path)
        # Python 3.11 raises RuntimeError for a loop on resolve(); stat() gives ELOOP.
        if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
            return f"is a symbolic link to {target} that loops back on itself"
        return f"is a symbolic link to {target}, which does not exist"
    return ""


def _one_line(exc: BaseException, path: Path) -> str:
    text = " ".join(str(exc).replace(str(path), path.name).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_image(path: Path, cache: Path | None = None) -> ImageFile:
    """Read a NIfTI, PNG or JPEG file completely.

    Parameters
    ----------
    path : pathlib.Path
        The file; its suffix (see :data:`SUFFIXES`) selects the reader.
    cache : pathlib.Path, optional
        A site's disk cache (``<state-dir>/cache``, see :mod:`client.case_cache`):
        the decoded array is taken from there when the file is unchanged, and put
        there after decoding. Without it only this process's cache is used.

    Returns
    -------
    ImageFile
        The array as stored, with affine, spacing, format and (NIfTI) header. The
        array is shared with other callers and read-only.

    Raises
    ------
    DataError
        The file is missing, has an unsupported suffix, or cannot be decoded
        (truncated, corrupt, not an image).

    """
    path = Path(path)
    suffix = _suffix(path.name)
    if not suffix:
        raise DataError(path, "is not a supported image file", _SUPPORTED)
    link = unreadable_link(path)
    if link:
        raise DataError(path, link, "point the link at the real file or replace it by the file")
    if not path.exists():
        raise DataError(path, "does not exist", "check the path or add the file")
    if not path.is_file():
        raise DataError(path, "is not a file", _SUPPORTED)
    # Taken before reading: a file changed while it is read gets a new key next time.
    key = case_cache.file_identity(path)
    cached = _DECODED.get(key)
    if cached is not None:
        _DECODED.move_to_end(key)
        return cached
    fmt = _FORMATS[suffix]
    image = _from_disk(path, fmt, key, cache) if cache is not None else None
    if image is None:
        image = _read_nifti(path) if fmt == "nifti" else _read_picture(path, fmt)
        global DECODES
        DECODES += 1
        if cache is not None:
            case_cache.store(cache, "decoded", [key[0]], _disk_key(key),
                             {"array": image.array})
    # Shared between callers: nobody may change a cached array in place.
    image.array.flags.writeable = False
    _remember(key, image)
    return image


#: Files decoded by this process so far (tests count it: a case is decoded once per
#: process, and not at all in a process that finds it in the site's disk cache).
DECODES = 0
#: Decoded files of this process, by :func:`client.case_cache.file_identity`: a
#: changed file has a new key, so it is read again. Bounded, least recently used first out.
_DECODED: OrderedDict[case_cache.Identity, ImageFile] = OrderedDict()
_CACHE_BYTES = 4 * 2**30


_cached_bytes = 0


def _remember(key: case_cache.Identity, image: ImageFile) -> None:
    global _cached_bytes
    _DECODED[key] = image
    _cached_bytes += image.array.nbytes
    while _cached_bytes > _CACHE_BYTES and len(_DECODED) > 1:
        _, dropped = _DECODED.popitem(last=False)
        _cached_bytes -= dropped.array.nbytes


def forget_decoded() -> None:
    """Empty this process's cache of decoded files (a site's disk cache stays)."""
    global _cached_bytes
    _DECODED.clear()
    _cached_bytes = 0


def _disk_key(key: case_cache.Identity) -> list[object]:
    return [*key, case_cache.code_version(__name__)]


def _from_disk(path: Path, fmt: str, key: case_cache.Identity, cache: Path) -> ImageFile | None:
    """Return the file's decoded array from the site's disk cache, or None on a miss.

    Only the voxels are cached. A NIfTI's header and affine are read from the file
    again: that reads its first few hundred bytes, without decompressing the voxels.
    """
    entry = case_cache.load(cache, "decoded", [key[0]], _disk_key(key), ["array"])
    if entry is None:
        return None
    array = entry["array"]
    if fmt != "nifti":
        return ImageFile(array=array, affine=np.eye(4, dtype=np.float64), spacing=(1.0, 1.0),
                         fmt=fmt, header=None)
    try:
        img: Any = nib.load(str(path))
        header, affine = img.header, np.array(img.affine, dtype=np.float64)
        zooms, shape = header.get_zooms(), tuple(img.shape)
    except _READ_ERRORS:
        return None  # decoding names the problem
    if shape != array.shape:
        return None
    spacing = tuple(float(z) for z in zooms[:min(array.ndim, 3)])
    return ImageFile(array=array, affine=affine, spacing=spacing, fmt=fmt, header=header)


def _read_nifti(path: Path) -> ImageFile:
    try:
        img: Any = nib.load(str(path))
        # nibabel is lazy: force decompression and decoding here, inside the try.
        array = np.asarray(img.dataobj)
        header = img.header
        affine = np.array(img.affine, dtype=np.float64)
        zooms = header.get_zooms()
    except _READ_ERRORS as exc:
        problem = f"cannot be read as NIfTI ({_one_line(exc, path)})"
        raise DataError(path, problem, _CORRUPT_FIX) from None
    if array.ndim < 2 or array.size == 0:
        raise DataError(
            path, f"has shape {array.shape}, not an image", "a NIfTI image needs at least 2 axes"
        )
    n_spatial = min(array.ndim, 3)
    spacing = tuple(float(z) for z in zooms[:n_spatial])
    return ImageFile(array=array, affine=affine, spacing=spacing, fmt="nifti", header=header)


def _read_picture(path: Path, fmt: str) -> ImageFile:
    kind = "PNG" if fmt == "png" else "JPEG"
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            _refuse_alpha_only(img, path)
            if mode in _PIL_CONVERT:
                converted = img.convert(_PIL_CONVERT[mode])
            elif mode in _PIL_KEEP:
                converted = img
            else:  # CMYK, YCbCr, RGBX, LAB, HSV, ...
                converted = img.convert("RGB")
            array = np.array(converted)
    except _READ_ERRORS as exc:
        problem = f"cannot be read as {kind} ({_one_line(exc, path)})"
        raise DataError(path, problem, _CORRUPT_FIX) from None
    if array.ndim == 3 and array.shape[2] not in (3, 4):  # pragma: no cover - defensive
        raise DataError(path, f"has {array.shape[2]} channels", "save it as grey, RGB or RGBA")
    return ImageFile(
        array=array,
        affine=np.eye(4, dtype=np.float64),
        spacing=(1.0, 1.0),
        fmt=fmt,
        header=None,
    )


def _refuse_alpha_only(img: Image.Image, path: Path) -> None:
    """Refuse a picture whose only content is its alpha channel.

    Reading drops alpha (grey and colour are what a model sees and what a label
    holds), so a mask painted as transparency would read as a constant, empty
    label and train the network towards Dice 0.
    """
    bands = img.getbands()
    if "A" not in bands or len(bands) < 2:
        return
    # A multi-band image gives one (min, max) pair per band.
    extrema = cast(tuple[tuple[float, float], ...], img.getextrema())
    per_band = dict(zip(bands, extrema, strict=True))
    low, high = per_band.pop("A")
    if low == high or any(lo != hi for lo, hi in per_band.values()):
        return
    value = next(iter(per_band.values()))[0]
    raise DataError(
        path,
        f"keeps its content in the alpha (transparency) channel while its "
        f"{'/'.join(per_band)} channel(s) are all {value}, so it would read as empty",
        "save the mask as a single-channel greyscale PNG, e.g. "
        "Image.open(f).getchannel('A').save(f)",
    )


def write_mask(
    mask: np.ndarray, like: ImageFile, path: Path, *, num_classes: int | None = None
) -> None:
    """Write a class-index mask beside or in place of an image's format, atomically.

    Parameters
    ----------
    mask : numpy.ndarray
        Integer class indices in [0, 255], shaped like the spatial axes of
        ``like.array`` (``(H, W)`` for PNG/JPEG, ``(X, Y[, Z])`` for NIfTI).
    like : ImageFile
        The image the mask belongs to; a NIfTI mask gets its affine and header.
    path : pathlib.Path
        Output file; ``.nii.gz``/``.nii`` writes NIfTI (uint8), ``.png`` writes an
        8-bit single-channel PNG. JPEG is refused (lossy compression alters classes).
    num_classes : int, optional
        When greater than 2 the PNG keeps class indices even if this mask only
        holds 0 and 1. By default a mask whose values are all in {0, 1} is binary
        and written to PNG as {0, 255}; any other mask keeps its class indices.

    Raises
    ------
    DataError
        ``path`` has an unsupported or lossy suffix.
    ValueError
        ``mask`` is not integer-valued in [0, 255] or does not fit ``like``.

    """
    path = Path(path)
    suffix = _suffix(path.name)
    if not suffix:
        raise DataError(path, "is not a supported mask file name", "use .nii.gz, .nii or .png")
    if _FORMATS[suffix] == "jpeg":
        raise DataError(
            path, "cannot hold a mask: JPEG compression changes class values", "write it as .png"
        )
    values = _mask_uint8(mask, like)
    if _FORMATS[suffix] == "png":
        if values.ndim != 2:
            raise ValueError(f"a PNG mask must be 2D, got shape {values.shape} for {path}")
        binary = (num_classes is None or num_classes <= 2) and int(values.max(initial=0)) <= 1
        picture = Image.fromarray(values * np.uint8(255) if binary else values)
        write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"), suffix=suffix)
        return
    nifti = _nifti_mask(values, like)
    write_atomic(path, lambda tmp: nib.save(nifti, str(tmp)), suffix=suffix)


def _mask_uint8(mask: np.ndarray, like: ImageFile) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim < 2 or like.array.shape[: mask.ndim] != mask.shape:
        raise ValueError(
            f"mask shape {mask.shape} does not match the image's spatial shape "
            f"{like.array.shape[: max(mask.ndim, 2)]}"
        )
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.number):
        raise ValueError(f"mask dtype {mask.dtype} is not numeric")
    if mask.size and (
        not np.all(np.isfinite(mask))
        or np.any(mask != np.round(mask))
        or mask.min() < 0
        or mask.max() > 255
    ):
        raise ValueError("mask values must be integer class indices in [0, 255]")
    return mask.astype(np.uint8)


def _nifti_mask(values: np.ndarray, like: ImageFile) -> nib.Nifti1Image:
    return _nifti_like(values, like, np.uint8, display_max=0.0)


def _nifti_like(values: np.ndarray, like: ImageFile, dtype: type[np.generic],
                display_max: float) -> nib.Nifti1Image:
    header = like.header if like.fmt == "nifti" else None
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    if header is not None and not isinstance(header, nib.Nifti1Header):
        header = None  # e.g. Analyze; keep the affine only
    img = image_class(values, like.affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(None, None)
    img.header.set_intent("none")
    img.header["cal_min"] = 0
    img.header["cal_max"] = display_max
    return img


def write_map(values: np.ndarray, like: ImageFile, path: Path) -> None:
    """Write a per-voxel map with values in ``[0, 1]`` in the geometry of an image, atomically.

    Parameters
    ----------
    values : numpy.ndarray
        Finite values in ``[0, 1]``, shaped like the spatial axes of ``like.array``.
    like : ImageFile
        The image the map belongs to; a NIfTI map gets its affine and header, as
        :func:`write_mask` gives a mask.
    path : pathlib.Path
        ``.nii.gz``/``.nii`` writes float32 NIfTI (display window 0 to 1);
        ``.png`` writes an 8-bit greyscale PNG of the image's size, 0 to 255 for
        0 to 1, which any viewer shows without settings.

    Raises
    ------
    DataError
        ``path`` is not ``.nii.gz``, ``.nii`` or ``.png``.
    ValueError
        ``values`` are outside ``[0, 1]``, not finite, or do not fit ``like``.

    """
    path = Path(path)
    suffix = _suffix(path.name)
    if not suffix or _FORMATS[suffix] == "jpeg":
        raise DataError(path, "is not a supported map file name", "use .nii.gz, .nii or .png")
    values = np.asarray(values, dtype=np.float32)
    if values.ndim < 2 or like.array.shape[: values.ndim] != values.shape:
        raise ValueError(f"map shape {values.shape} does not match the image's spatial shape "
                         f"{like.array.shape[: max(values.ndim, 2)]}")
    if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0
                            and values.max() <= 1):
        raise ValueError("map values must be finite and in [0, 1]")
    if _FORMATS[suffix] == "png":
        if values.ndim != 2:
            raise ValueError(f"a PNG map must be 2D, got shape {values.shape} for {path}")
        picture = Image.fromarray(np.round(values * 255).astype(np.uint8))
        write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"), suffix=suffix)
        return
    nifti = _nifti_like(values, like, np.float32, display_max=1.0)
    write_atomic(path, lambda tmp: nib.save(nifti, str(tmp)), suffix=suffix)
