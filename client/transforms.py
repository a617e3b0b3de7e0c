"""Pure array transforms applied to a case after reading it (no I/O).

The functions that can meet bad data take the file's ``path`` only to name it in a
:class:`~shared.errors.DataError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.errors import DataError


def _dims_fix(spatial_dims: int) -> str:
    other = 5 - spatial_dims
    return (
        f"the model is {spatial_dims}D (patch-size has {spatial_dims} values); "
        f"use {spatial_dims}D images or a {other}-value patch-size"
    )


def to_channel_first(array: np.ndarray, spatial_dims: int, path: Path) -> np.ndarray:
    """Move the channel axis of an image to the front.

    Parameters
    ----------
    array : numpy.ndarray
        ``(*spatial)`` or channel-last ``(*spatial, C)``. NIfTI's
        ``(*spatial, 1, C)`` layout (an empty time axis before the components)
        is accepted too.
    spatial_dims : int
        2 or 3.
    path : pathlib.Path
        The file the array came from, named in errors.

    Returns
    -------
    numpy.ndarray
        ``(C, *spatial)``; ``C`` is 1 when ``array`` had no channel axis.

    Raises
    ------
    DataError
        The number of axes does not fit a ``spatial_dims``-D image.

    """
    if array.ndim == spatial_dims + 2 and array.shape[spatial_dims] == 1:
        array = np.squeeze(array, axis=spatial_dims)
    if array.ndim == spatial_dims:
        return array[np.newaxis]
    if array.ndim == spatial_dims + 1:
        return np.moveaxis(array, -1, 0)
    raise DataError(
        path,
        f"has shape {array.shape}, which is not a {spatial_dims}D image with an optional "
        "channel axis",
        _dims_fix(spatial_dims),
    )


def match_channels(image_cf: np.ndarray, in_channels: int, path: Path) -> np.ndarray:
    """Adapt a channel-first image to the model's number of input channels.

    Parameters
    ----------
    image_cf : numpy.ndarray
        ``(C, *spatial)``.
    in_channels : int
        Channels the model expects.
    path : pathlib.Path
        The image's file, named in errors.

    Returns
    -------
    numpy.ndarray
        ``(in_channels, *spatial)``: unchanged when ``C == in_channels``; a single
        channel repeated; RGB or RGBA averaged over R, G, B when ``in_channels``
        is 1; RGBA without its alpha channel when ``in_channels`` is 3.

    Raises
    ------
    DataError
        Any other combination of ``C`` and ``in_channels``.

    """
    channels = image_cf.shape[0]
    if channels == in_channels:
        return image_cf
    if channels == 1:
        return np.repeat(image_cf, in_channels, axis=0)
    if channels in (3, 4) and in_channels == 1:
        return image_cf[:3].astype(np.float64).mean(axis=0, keepdims=True)
    if channels == 4 and in_channels == 3:
        return image_cf[:3]
    raise DataError(
        path,
        f"has {channels} channels but the model expects in-channels = {in_channels}",
        f"set in-channels to {channels} or convert the images (1 channel is repeated; "
        "RGB/RGBA can feed a 1-channel model)",
    )


def label_to_single_channel(label_cf: np.ndarray, path: Path) -> np.ndarray:
    """Reduce a channel-first label to its spatial class map.

    Parameters
    ----------
    label_cf : numpy.ndarray
        ``(C, *spatial)``. One channel is taken as is; 3 (RGB) or 4 (RGBA, alpha
        ignored) channels must be equal, as in a grey mask saved in colour.
    path : pathlib.Path
        The label's file, named in errors.

    Returns
    -------
    numpy.ndarray
        ``(*spatial)``.

    Raises
    ------
    DataError
        The colour channels differ, or there are 2 or more than 4 channels.

    """
    channels = label_cf.shape[0]
    if channels == 1:
        return label_cf[0]
    if channels not in (3, 4):
        raise DataError(
            path,
            f"has {channels} channels; a label must be one channel of class indices",
            "save the label as a single-channel image",
        )
    colour = label_cf[:3]
    if not (np.array_equal(colour[0], colour[1]) and np.array_equal(colour[0], colour[2])):
        raise DataError(
            path,
            "is a colour label whose R, G and B channels differ; a label must hold one "
            "class index per pixel",
            "save it as a single-channel (greyscale) mask of class indices",
        )
    return colour[0]


def labels_to_classes(label: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """Turn a spatial label array into int64 class indices in ``[0, num_classes)``.

    Parameters
    ----------
    label : numpy.ndarray
        ``(*spatial)`` label values as stored.
    num_classes : int
        Classes including background. With 2 the label is binarised: integer
        values by ``label > 0`` (so {0, 1} and {0, 255} both work), soft masks
        (non-integer values) by ``label >= 0.5 * label.max()``. With more, values
        must already be class indices.
    path : pathlib.Path
        The label's file, named in errors.

    Returns
    -------
    numpy.ndarray
        int64 array of the same shape.

    Raises
    ------
    DataError
        NaN/inf or negative values; for ``num_classes > 2`` non-integer values or
        values outside ``[0, num_classes)``.

    """
    label = np.asarray(label)
    if label.dtype == np.bool_:
        label = label.astype(np.uint8)
    if not np.issubdtype(label.dtype, np.number) or np.issubdtype(label.dtype, np.complexfloating):
        raise DataError(path, f"has non-numeric label dtype {label.dtype}", "store class indices")
    if label.size == 0:
        return label.astype(np.int64)
    floating = np.issubdtype(label.dtype, np.floating)
    if floating and not np.all(np.isfinite(label)):
        raise DataError(path, "label contains NaN or infinite values", "fix or remove the label")
    low = label.min()
    if low < 0:
        raise DataError(
            path,
            f"label has negative values (minimum {low}); is an image stored as a label?",
            "labels must be class indices >= 0 or a mask in [0, max]",
        )
    integral = not floating or bool(np.all(label == np.round(label)))
    if num_classes == 2:
        if integral:
            return (label > 0).astype(np.int64)
        return (label >= 0.5 * label.max()).astype(np.int64)
    if not integral:
        example = label[label != np.round(label)].flat[0]
        raise DataError(
            path,
            f"label has non-integer values (e.g. {example}) but num-classes is {num_classes}",
            "a multi-class label must hold class indices 0 .. num-classes - 1",
        )
    high = label.max()
    if high >= num_classes:
        bad = np.unique(label[label >= num_classes])[:5]
        shown = ", ".join(str(int(v)) for v in bad)
        raise DataError(
            path,
            f"label has values {shown} outside [0, {num_classes}) for num-classes {num_classes}",
            f"set num-classes to at least {int(high) + 1} or fix the label",
        )
    return label.astype(np.int64)


# A mask holds a handful of values; even an anti-aliased or soft one keeps most
# pixels at its two ends. These bounds separate that from a picture.
IMAGE_LIKE_VALUES = 32
"""More distinct values than this make a label a candidate for "looks like an image"."""
IMAGE_LIKE_CORRELATION = 0.9
"""|Pearson r| with the image above which a many-valued label is taken for the image."""
IMAGE_LIKE_MID_FRACTION = 0.5
"""Share of pixels in the middle 80 % of the value range above which a label is a picture."""
_LABEL_FIX = "point the label at the segmentation mask (class indices, 0/1 or 0/255)"


def refuse_lossy_label(fmt: str, path: Path) -> None:
    """Refuse a label stored as JPEG.

    JPEG compression adds grey values around every edge; ``label > 0`` then turns
    them into foreground (about half the pixels of a thin-vessel mask).

    Raises
    ------
    DataError
        ``fmt`` is ``"jpeg"``.

    """
    if fmt == "jpeg":
        raise DataError(
            path,
            "is a JPEG label: lossy compression adds stray grey values around every edge and "
            "binarising would make them false foreground",
            "save the mask losslessly as PNG or NIfTI",
        )


def refuse_copy_of_image(label: np.ndarray, image: np.ndarray, path: Path,
                         image_name: str) -> None:
    """Refuse a label whose voxels equal its image's, as read from disk.

    Raises
    ------
    DataError
        ``label`` and ``image`` have the same shape and values.

    """
    if label.shape == image.shape and np.array_equal(label, image):
        raise DataError(path, f"is identical to its image {image_name}, not a mask", _LABEL_FIX)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


def refuse_image_like_label(label: np.ndarray, image_cf: np.ndarray, path: Path,
                            image_name: str) -> None:
    """Refuse a single-channel label that is a picture rather than a mask.

    A label with more than :data:`IMAGE_LIKE_VALUES` distinct values is refused
    when it correlates with its image (``|r| >`` :data:`IMAGE_LIKE_CORRELATION`)
    or when most of its pixels lie between background and foreground. Binary,
    class-index and soft masks (most pixels at either end) pass.

    Parameters
    ----------
    label : numpy.ndarray
        ``(*spatial)`` label values as stored.
    image_cf : numpy.ndarray
        ``(C, *spatial)`` image of the same case.
    path : pathlib.Path
        The label's file, named in errors.
    image_name : str
        The image's file name, named in errors.

    Raises
    ------
    DataError
        The label looks like an image.

    """
    if not np.issubdtype(label.dtype, np.number) or label.shape != image_cf.shape[1:]:
        return
    values, counts = np.unique(label, return_counts=True)
    if values.size <= IMAGE_LIKE_VALUES:
        return
    low, high = float(values[0]), float(values[-1])
    margin = 0.1 * (high - low)
    middle = (values > low + margin) & (values < high - margin)
    mid_fraction = float(counts[middle].sum()) / label.size
    r = _pearson(label, image_cf.mean(axis=0))
    if abs(r) > IMAGE_LIKE_CORRELATION or mid_fraction > IMAGE_LIKE_MID_FRACTION:
        raise DataError(
            path,
            f"looks like an image, not a mask: {values.size} distinct values, "
            f"{mid_fraction:.0%} of pixels between background and foreground, correlation "
            f"{r:+.2f} with its image {image_name}",
            _LABEL_FIX,
        )


def refuse_compression_traces(label: np.ndarray, num_classes: int, path: Path) -> None:
    """Refuse a binary-task label whose extra grey values hug its two ends.

    That is what a mask once saved as JPEG looks like, even after conversion to
    PNG; binarising by ``label > 0`` would make the values near 0 foreground. An
    anti-aliased mask spreads its few edge values over the whole range instead.
    Non-integer (soft) masks are thresholded at half their maximum and are not
    affected, so they pass.

    Raises
    ------
    DataError
        ``num_classes`` is 2 and at least 4 distinct integer values lie within 10 %
        of the minimum or maximum, on more pixels than the values between.

    """
    if num_classes != 2 or not np.issubdtype(label.dtype, np.number) or label.size == 0:
        return
    values, counts = np.unique(label, return_counts=True)
    if values.size < 6 or not np.all(values == np.round(values)):
        return
    low, high = values[0], values[-1]
    margin = 0.1 * (high - low)
    inner = (values > low) & (values < high)
    near = inner & ((values <= low + margin) | (values >= high - margin))
    if np.count_nonzero(near) < 4 or counts[near].sum() <= counts[inner & ~near].sum():
        return
    shown = ", ".join(f"{v:g}" for v in values[near][[0, 1, -2, -1]])
    threshold = f"{np.ceil((float(low) + float(high)) / 2):g}"
    raise DataError(
        path,
        f"label has {int(np.count_nonzero(inner))} grey values between {low:g} and {high:g}, "
        f"most near either end (e.g. {shown}): the trace of JPEG compression, which "
        "binarising would turn into false foreground",
        f"export the mask again losslessly (PNG or NIfTI), or set values >= {threshold} to 1 "
        "and the rest to 0",
    )
