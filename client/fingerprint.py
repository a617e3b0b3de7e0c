"""A site's data fingerprint: aggregate numbers for the server's planner.

The per-case statistics computed here never leave this module: only their
medians, coarsened, go into the :class:`~shared.planning.Fingerprint` that is
sent to the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from scipy import ndimage

from client.config import SiteConfig
from client.data_contract import declared_channels, read_raw_case, site_split
from client.imaging import read_image
from shared.normalization import dark_mask
from shared.planning import MAX_CLASS_CODES, Fingerprint


def case_statistics(raw: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Return one case's statistics (these stay at the site).

    Parameters
    ----------
    raw : numpy.ndarray
        ``(C, *spatial)`` image intensities as stored (before normalisation).
    label : numpy.ndarray
        ``(*spatial)`` label as stored; every value above 0 is foreground.

    Returns
    -------
    dict of str to float
        ``foreground`` share, structure ``thickness`` in voxels (four times the mean
        distance of a foreground voxel to the background, exact for a strip),
        ``dark`` share of voxels in the dark frame (:func:`shared.normalization.dark_mask`),
        and foreground intensity percentiles ``fg_low``, ``fg_mid``, ``fg_high``.
    """
    grey = raw.astype(np.float64).mean(axis=0)
    fg = label > 0
    dark = float(dark_mask(raw).mean())
    stats = {"foreground": float(fg.mean()), "dark": dark, "thickness": 0.0,
             "fg_low": 0.0, "fg_mid": 0.0, "fg_high": 0.0}
    if fg.any():
        distance = ndimage.distance_transform_edt(fg)
        stats["thickness"] = float(4.0 * distance[fg].mean())
        values = grey[fg]
        stats["fg_low"], stats["fg_mid"], stats["fg_high"] = (
            float(v) for v in np.percentile(values, [0.5, 50.0, 99.5]))
    return stats


def label_classes(values: np.ndarray) -> int:
    """Return what a site's label values code, as :attr:`Fingerprint.classes` says it.

    Parameters
    ----------
    values : numpy.ndarray
        The distinct values of every training label of the site, as stored.

    Returns
    -------
    int
        ``K`` when the values are exactly the class codes ``0 .. K-1`` with
        ``2 <= K <= MAX_CLASS_CODES`` (``{0, 1}``, or Decathlon's convention for
        several structures); 1 when every label is background only; 0 when the
        values are no class codes but one foreground by threshold: ``{0, 255}``,
        a soft or anti-aliased mask, or codes with gaps such as ``{0, 3, 7}``,
        which training merges and ``fedseg site check`` points out.
    """
    codes = np.unique(np.asarray(values, dtype=np.float64))
    if codes.size == 1 and codes[0] == 0:
        return 1
    if not 2 <= codes.size <= MAX_CLASS_CODES \
            or not np.array_equal(codes, np.arange(codes.size, dtype=np.float64)):
        return 0
    return int(codes.size)


def site_fingerprint(cases: Sequence[tuple[np.ndarray, np.ndarray, tuple[float, ...]]],
                     has_spacing: bool) -> Fingerprint:
    """Summarise a site's training cases as medians, coarsened.

    Parameters
    ----------
    cases : sequence of (raw image, label, spacing)
        Channel-first raw images, their labels as stored and voxel spacings.
    has_spacing : bool
        Whether the files carry a physical spacing (NIfTI) or not.

    Returns
    -------
    Fingerprint
        Only aggregate numbers: sizes rounded to multiples of 8, fractions to two
        decimals, thickness to one decimal, and the number of classes the labels
        code together (:func:`label_classes`).
    """
    if not cases:
        raise ValueError("a fingerprint needs at least one case")
    stats = [case_statistics(raw, label) for raw, label, _ in cases]
    shapes = np.array([label.shape for _, label, _ in cases], dtype=np.float64)
    spacings = np.array([spacing for _, _, spacing in cases], dtype=np.float64)

    def median(key: str) -> float:
        return float(np.median([s[key] for s in stats]))

    return Fingerprint(
        num_cases=len(cases),
        spatial_dims=int(shapes.shape[1]),
        channels=int(cases[0][0].shape[0]),
        shape=tuple(int(8 * round(v / 8)) for v in np.median(shapes, axis=0)),
        spacing=tuple(round(float(v), 3) for v in np.median(spacings, axis=0)),
        has_spacing=has_spacing,
        foreground_fraction=round(median("foreground"), 2),
        thickness=round(median("thickness"), 1),
        dark_fraction=round(median("dark"), 2),
        fg_intensity=(_two_digits(median("fg_low")), _two_digits(median("fg_mid")),
                      _two_digits(median("fg_high"))),
        classes=label_classes(np.concatenate([np.unique(label) for _, label, _ in cases])),
    )


def _two_digits(value: float) -> float:
    """Round to two significant digits: a scale, not a measurement."""
    if value == 0:
        return 0.0
    return float(f"{value:.2g}")


def fingerprint_site(site: SiteConfig, *, disk_cache: bool = True) -> Fingerprint:
    """Return the fingerprint of ``site``'s training cases (the validation split is left out).

    A site that trains under DP-SGD also reports how many patients its training
    split holds: the count its privacy accounting uses, and the planner needs.

    With ``disk_cache`` the decoded files come from, and go to, the site's disk
    cache (``site.cache_dir``); a tool that only looks at a folder turns it off.

    Raises
    ------
    DataError
        The site has no training cases, or one cannot be read.
    """
    train, _ = site_split(site.data_path, site.patient_pattern, site.val_fraction)
    cache = site.cache_dir if disk_cache else None
    series = declared_channels(site.data_path)
    cases = [read_raw_case(ref, cache, series) for ref in train]
    # Decoded already by read_raw_case: the per-process cache answers.
    has_spacing = read_image(train[0].image, cache).fmt == "nifti"
    fingerprint = site_fingerprint(cases, has_spacing=has_spacing)
    if not site.privacy.enabled:
        return fingerprint
    return replace(fingerprint, dp_patients=len({ref.patient_id for ref in train}))
