"""Label checks that only ``fedseg site check`` makes.

The data contract (``load_case``) already refuses labels that would silently
corrupt training: masks in the alpha channel, JPEG labels and their traces,
copies of the image, image-like labels. What is left here is a label that
training reads as intended by one reading but perhaps not by the site: a
binary task (``num-classes`` 2) merges every non-zero value into one
foreground, which is right for "any lesion" but wrong when {0, 3, 7} are three
structures. Training keeps merging (it is a documented, legitimate choice);
site check asks the site to make it explicit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.imaging import ImageFile
from client.transforms import label_to_single_channel, to_channel_first

_BINARY_SETS = ({0, 1}, {0, 255})
_SHOWN = 6
# Class codes come in a handful; an 8-bit soft mask spreads over many grey levels.
_SOFT_MIN_VALUES = 16


def label_values(label: ImageFile, spatial_dims: int, path: Path) -> np.ndarray:
    """Return the sorted distinct values of a label as training reads it.

    Colour labels give the values of their (equal) colour channels, so an
    opaque alpha channel does not add a spurious 255.

    Raises
    ------
    DataError
        The label has no single-channel reading (as ``load_case`` would raise).

    """
    label_cf = to_channel_first(label.array, spatial_dims, path)
    return np.unique(label_to_single_channel(label_cf, path))


def format_values(values: np.ndarray) -> str:
    """Return values as ``"0,3,7"``, the first few only, for a report column."""
    shown = ",".join(f"{v:g}" for v in values[:_SHOWN])
    return shown + ("…" if values.size > _SHOWN else "")


def binary_values_problem(values: np.ndarray, num_classes: int) -> str:
    """Return why a binary task's label values are ambiguous, or ``""``.

    Parameters
    ----------
    values : numpy.ndarray
        Sorted distinct label values (see :func:`label_values`).
    num_classes : int
        Classes including background; only 2 is checked.

    Returns
    -------
    str
        ``""`` for values within {0, 1} or {0, 255}, a soft mask (non-integer
        values) within [0, 1] or [0, 255], or an 8-bit soft mask (at least 16
        grey levels up to 255); else one line naming the values found and how
        to map them.

    """
    if num_classes != 2 or values.size == 0:
        return ""
    low, high = float(values[0]), float(values[-1])
    if not np.all(values == np.round(values)):
        if low >= 0 and (high <= 1 or high <= 255):
            return ""
        return (f"label is a soft mask with values in [{low:g}, {high:g}], outside [0, 1] and "
                "[0, 255]; rescale it to [0, 1] (it is thresholded at half its maximum)")
    found = {int(v) for v in values}
    if any(found <= allowed for allowed in _BINARY_SETS):
        return ""
    if low >= 0 and high == 255 and values.size >= _SOFT_MIN_VALUES:
        return ""  # an 8-bit anti-aliased (soft) mask, not a handful of class codes
    classes = len(found | {0})
    return (f"label values {format_values(values)} are not a binary mask ({{0,1}} or "
            f"{{0,255}}) and num-classes 2 would merge every non-zero value into one "
            f"foreground; if they are {classes} classes remap them to 0..{classes - 1} (the "
            f"planner then plans num-classes {classes}; or set num-classes {int(high) + 1} to "
            "keep the values), if all are foreground remap every non-zero value to 1")
