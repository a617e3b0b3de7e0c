"""Synthetic multi-site segmentation data: one anatomy, several scanners.

Real hospitals image the same organs with different scanners and protocols, so a
federation sees the same task under shifted intensities, contrast, blur, noise and
resolution. This module reproduces that on a small scale:

* :func:`make_phantom` draws the anatomy of one case: a lobulated, textured
  "organ" (the label), one or two unlabelled distractor blobs and smooth
  background tissue.
* :func:`render_site` applies one hospital's :class:`SiteStyle` to it.
* :func:`write_synthetic_federation` writes one folder per site in the Medical
  Segmentation Decathlon layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``):
  grey PNG for 2D, NIfTI for 3D.

Everything is deterministic for a given seed, and cheap enough to generate in tests.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

MIN_SIDE = 16
"""Smallest image side accepted: below it the organ and distractors no longer fit."""

PNG_INTENSITY_WINDOW = (-0.5, 2.5)
"""Rendered intensities mapped linearly onto 0..255 in 2D PNG files, the same for every
site, so that site differences in brightness and contrast survive the 8-bit encoding.
``value = lo + png / 255 * (hi - lo)`` recovers the rendered intensity."""

ORGAN_LEVEL = 0.7
BACKGROUND_LEVEL = 0.22
# Background texture is clipped below this so that everything above it outside the
# organ is a distractor; the distractor-is-unlabelled test relies on the gap.
BACKGROUND_CEILING = 0.38
DARK_DISTRACTOR_LEVEL = 0.47

# Radii relative to the smallest side. 3D radii are a little larger so the organ
# still fills a few percent of the volume (a ball's share falls with the cube).
_RADIUS_RANGE = {2: (0.15, 0.30), 3: (0.20, 0.32)}
_CENTRE_RANGE = (0.42, 0.58)
# Kept small enough that the organ stays inside the image: the largest radius times
# (1 + sum of amplitudes) is 0.32 * 1.18 < 0.42, the closest centre to an edge.
_HARMONIC_AMPLITUDE = (0.02, 0.06)
_NUM_HARMONICS = 3


@dataclass(frozen=True)
class SiteStyle:
    """How one synthetic hospital's scanner renders the same anatomy.

    Attributes
    ----------
    name : str
        Folder name of the site, e.g. ``site-a``.
    intensity_scale : float
        Multiplies the anatomy's intensities (contrast); must be positive.
    intensity_offset : float
        Added after scaling (brightness).
    bias_strength : float
        Amplitude, in ``[0, 1)``, of a smooth multiplicative bias field (coil
        inhomogeneity): the field ranges over ``1 ± bias_strength``.
    noise_std : float
        Standard deviation of the additive Gaussian noise.
    blur_sigma : float
        Gaussian blur in voxels; 0 disables it.
    resolution_factor : int
        1 renders at full resolution; ``k`` averages ``k``-voxel blocks and repeats
        them, giving a blocky image of ``1/k`` the resolution at the same size.

    """

    name: str
    intensity_scale: float = 1.0
    intensity_offset: float = 0.0
    bias_strength: float = 0.0
    noise_std: float = 0.03
    blur_sigma: float = 0.0
    resolution_factor: int = 1

    def __post_init__(self) -> None:
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\"):
            raise ValueError(f"site style name must be a plain folder name, got {self.name!r}")
        numbers = (
            self.intensity_scale, self.intensity_offset, self.bias_strength,
            self.noise_std, self.blur_sigma,
        )
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"site style {self.name!r}: every value must be finite")
        if self.intensity_scale <= 0:
            raise ValueError(
                f"site style {self.name!r}: intensity_scale must be positive, "
                f"got {self.intensity_scale}"
            )
        if not 0.0 <= self.bias_strength < 1.0:
            raise ValueError(
                f"site style {self.name!r}: bias_strength must be in [0, 1), "
                f"got {self.bias_strength}"
            )
        if self.noise_std < 0 or self.blur_sigma < 0:
            raise ValueError(
                f"site style {self.name!r}: noise_std and blur_sigma must not be negative"
            )
        if isinstance(self.resolution_factor, bool) or not isinstance(
            self.resolution_factor, int
        ) or self.resolution_factor < 1:
            raise ValueError(
                f"site style {self.name!r}: resolution_factor must be an integer >= 1, "
                f"got {self.resolution_factor!r}"
            )

    @property
    def worst_contrast_to_noise(self) -> float:
        """Organ-minus-background contrast over noise where the bias field is lowest."""
        contrast = (ORGAN_LEVEL - BACKGROUND_LEVEL) * self.intensity_scale
        contrast *= 1.0 - self.bias_strength
        return math.inf if self.noise_std == 0 else contrast / self.noise_std


# The three reference hospitals: a clean, sharp scanner; a dim, low-contrast,
# low-resolution one with a strong coil bias; a high-contrast, dark, noisy one.
_REFERENCE_STYLES = (
    SiteStyle("site-a", 1.0, 0.0, bias_strength=0.0, noise_std=0.03,
              blur_sigma=0.0, resolution_factor=1),
    SiteStyle("site-b", 0.6, 0.3, bias_strength=0.25, noise_std=0.04,
              blur_sigma=1.0, resolution_factor=2),
    SiteStyle("site-c", 1.4, -0.2, bias_strength=0.15, noise_std=0.08,
              blur_sigma=0.5, resolution_factor=1),
)

# Every generated style keeps at least this contrast-to-noise ratio, so a small
# U-Net can still segment each site well.
_MIN_CONTRAST_TO_NOISE = 5.0


def site_name(index: int) -> str:
    """Return the folder name of the ``index``-th site (0 -> ``site-a``, 26 -> ``site-aa``)."""
    if index < 0:
        raise ValueError(f"site index must not be negative, got {index}")
    letters = ""
    n = index + 1
    while n:
        n, rest = divmod(n - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return f"site-{letters}"


def default_site_styles(num_sites: int) -> list[SiteStyle]:
    """Return ``num_sites`` clearly different, deterministic site styles.

    The first three are fixed reference hospitals (see the module source); further
    sites are drawn from a fixed seed within ranges that keep the organ's
    contrast-to-noise ratio at least 5 everywhere in the image.

    Parameters
    ----------
    num_sites : int
        How many styles to return; at least 1.

    Returns
    -------
    list of SiteStyle
        Named ``site-a``, ``site-b``, ... in order.

    """
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise ValueError(f"num_sites must be an integer >= 1, got {num_sites!r}")
    styles = list(_REFERENCE_STYLES[:num_sites])
    for index in range(len(styles), num_sites):
        # Seeded by the index alone so site-d is the same whether 4 or 40 are asked for.
        rng = np.random.default_rng([7919, index])
        scale = float(rng.uniform(0.6, 1.5))
        bias = float(rng.uniform(0.0, 0.3))
        ceiling = (ORGAN_LEVEL - BACKGROUND_LEVEL) * scale * (1 - bias) / _MIN_CONTRAST_TO_NOISE
        styles.append(
            SiteStyle(
                name=site_name(index),
                intensity_scale=round(scale, 3),
                intensity_offset=round(float(rng.uniform(-0.3, 0.3)), 3),
                bias_strength=round(bias, 3),
                noise_std=round(min(float(rng.uniform(0.02, 0.08)), ceiling), 4),
                blur_sigma=round(float(rng.uniform(0.0, 1.2)), 2),
                resolution_factor=int(rng.choice([1, 1, 2])),
            )
        )
    return styles


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must have 2 (2D) or 3 (3D) sides, got {shape}")
    if any(isinstance(s, bool) or not isinstance(s, int | np.integer) for s in shape):
        raise ValueError(f"shape must be integers, got {shape}")
    if min(shape) < MIN_SIDE:
        raise ValueError(f"every side of shape must be at least {MIN_SIDE}, got {shape}")
    return tuple(int(s) for s in shape)


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    # QR of a Gaussian matrix with the sign fix gives a uniformly random rotation.
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _random_unit_vector(rng: np.random.Generator, ndim: int) -> np.ndarray:
    v = rng.standard_normal(ndim)
    return v / np.linalg.norm(v)


def _ellipsoid(
    grid: np.ndarray,
    centre: np.ndarray,
    radii: np.ndarray,
    rotation: np.ndarray,
    harmonics: Sequence[tuple[float, int, np.ndarray]] = (),
) -> np.ndarray:
    """Return the mask of a rotated ellipsoid whose boundary radius is modulated.

    ``harmonics`` holds ``(amplitude, order, direction)``; each adds
    ``amplitude * T_order(d . direction)`` to the relative boundary radius in
    direction ``d``, where ``T`` is the Chebyshev polynomial. In 2D that is
    ``cos(order * angle)``; in 3D it is a smooth, low-frequency lobe pattern.
    """
    # grid: (ndim, *shape) voxel coordinates; rotate into the ellipsoid's frame.
    local = np.tensordot(rotation.T, grid - centre.reshape((-1,) + (1,) * (grid.ndim - 1)), 1)
    local /= radii.reshape((-1,) + (1,) * (grid.ndim - 1))
    radius = np.sqrt(np.sum(local * local, axis=0))
    boundary = np.ones_like(radius)
    if harmonics:
        direction = local / np.maximum(radius, 1e-6)
        for amplitude, order, axis in harmonics:
            cosine = np.clip(np.tensordot(axis, direction, 1), -1.0, 1.0)
            boundary += amplitude * np.cos(order * np.arccos(cosine))
    return radius <= boundary


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Return Gaussian-filtered white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    std = float(field.std())
    return field / std if std > 0 else field


def _place_blob(
    rng: np.random.Generator,
    occupied: np.ndarray,
    radius: float,
    margin: float,
) -> np.ndarray | None:
    """Pick a centre whose ball of ``radius`` stays ``margin`` away from ``occupied``.

    Returns ``None`` when no such centre exists.
    """
    shape = occupied.shape
    clearance = ndimage.distance_transform_edt(~occupied)
    ok = clearance >= radius + margin
    # Keep the blob inside the image, one voxel from each edge.
    for axis, side in enumerate(shape):
        index = np.arange(side)
        inside = (index >= radius + 1) & (index <= side - 1 - radius - 1)
        ok &= inside.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    candidates = np.flatnonzero(ok)
    if candidates.size == 0:
        return None
    flat = int(candidates[rng.integers(candidates.size)])
    return np.array(np.unravel_index(flat, shape), dtype=np.float64)


def make_phantom(
    rng: np.random.Generator, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the anatomy of one case, before any scanner style.

    The label is one organ: a randomly rotated ellipse (2D) or ellipsoid (3D) with
    radii 15-30 % (3D: 20-32 %) of the smallest side, a boundary modulated by a few low-frequency
    harmonics, a centre well inside the image and a mildly textured interior at
    about 0.7. Outside it lie one darker distractor blob (about 0.47) and, in half
    of the cases, a second, much smaller one as bright as the organ; neither is
    labelled, so the organ cannot be found by thresholding alone. The background is
    smooth tissue texture at about 0.22, never above 0.38.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness; the same state gives the same case.
    shape : tuple of int
        Two sides (2D) or three (3D), each at least 16.

    Returns
    -------
    image : numpy.ndarray
        float32 intensities in ``[0, 1]``.
    label : numpy.ndarray
        uint8 mask, 1 on the organ and 0 elsewhere.

    """
    shape = _check_shape(shape)
    ndim = len(shape)
    sides = np.asarray(shape, dtype=np.float64)
    side = float(sides.min())
    grid = np.indices(shape, dtype=np.float32)

    centre = rng.uniform(*_CENTRE_RANGE, size=ndim) * (sides - 1)
    radii = rng.uniform(*_RADIUS_RANGE[ndim], size=ndim) * side
    harmonics = [
        (float(rng.uniform(*_HARMONIC_AMPLITUDE)), int(rng.integers(2, 5)),
         _random_unit_vector(rng, ndim))
        for _ in range(_NUM_HARMONICS)
    ]
    organ = _ellipsoid(grid, centre, radii, _random_rotation(rng, ndim), harmonics)

    background = (
        BACKGROUND_LEVEL
        + 0.05 * _smooth_noise(rng, shape, side / 10)
        + 0.02 * _smooth_noise(rng, shape, 1.5)
    )
    image = np.clip(background, 0.05, BACKGROUND_CEILING).astype(np.float32)
    texture = np.clip(_smooth_noise(rng, shape, side / 16), -2.5, 2.5)
    image[organ] = ORGAN_LEVEL + 0.04 * texture[organ]

    occupied = organ.copy()
    # A darker neighbour (e.g. another organ), then sometimes a small bright one (a
    # vessel or lesion) that matches the organ's intensity but not its size or shape.
    blobs = [(rng.uniform(0.07, 0.11), DARK_DISTRACTOR_LEVEL + rng.uniform(-0.03, 0.03))]
    if rng.random() < 0.5:
        blobs.append((rng.uniform(0.035, 0.05), rng.uniform(0.72, 0.85)))
    for relative_radius, level in blobs:
        blob_radii = np.maximum(relative_radius * side * rng.uniform(0.7, 1.0, size=ndim), 1.5)
        blob_rotation = _random_rotation(rng, ndim)
        where = _place_blob(rng, occupied, float(blob_radii.max()), margin=2.0)
        if where is None:
            continue
        blob = _ellipsoid(grid, where, blob_radii, blob_rotation)
        image[blob] = float(level) + 0.02 * texture[blob]
        occupied |= blob
    return np.clip(image, 0.0, 1.0).astype(np.float32), organ.astype(np.uint8)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Return a smooth multiplicative field spanning ``1 ± strength``."""
    axes = np.meshgrid(*(np.linspace(-1.0, 1.0, s) for s in shape), indexing="ij")
    # Random linear and quadratic terms: a slow drift like a receive coil's profile.
    terms = [*axes, *(a * b for i, a in enumerate(axes) for b in axes[i:])]
    field = sum((float(rng.normal()) * t for t in terms), np.zeros(shape))
    field -= field.mean()
    peak = float(np.abs(field).max())
    if peak > 0:
        field /= peak
    return (1.0 + strength * field).astype(np.float32)


def _lower_resolution(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``-sized blocks and repeat them back to the input shape."""
    shape = image.shape
    padded_shape = tuple(-(-s // factor) * factor for s in shape)
    padded = np.pad(image, [(0, p - s) for p, s in zip(padded_shape, shape, strict=True)],
                    mode="edge")
    blocks = padded.reshape([n for p in padded_shape for n in (p // factor, factor)])
    low = blocks.mean(axis=tuple(range(1, 2 * image.ndim, 2)))
    for axis in range(image.ndim):
        low = np.repeat(low, factor, axis=axis)
    return low[tuple(slice(0, s) for s in shape)]


def render_site(image: np.ndarray, style: SiteStyle, rng: np.random.Generator) -> np.ndarray:
    """Render anatomy as one site's scanner would.

    Applied in order: multiplicative bias field, scale and offset, Gaussian blur,
    block downsampling and upsampling by ``resolution_factor``, additive noise.

    Parameters
    ----------
    image : numpy.ndarray
        2D or 3D anatomy from :func:`make_phantom`.
    style : SiteStyle
        The site's scanner.
    rng : numpy.random.Generator
        Source of the bias field and noise.

    Returns
    -------
    numpy.ndarray
        float32 image of the same shape; not clipped.

    """
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be 2D or 3D, got {image.ndim} dimensions")
    out = np.asarray(image, dtype=np.float32)
    if style.bias_strength > 0:
        out = out * _bias_field(rng, out.shape, style.bias_strength)
    out = out * np.float32(style.intensity_scale) + np.float32(style.intensity_offset)
    if style.blur_sigma > 0:
        out = ndimage.gaussian_filter(out, style.blur_sigma, mode="nearest")
    if style.resolution_factor > 1:
        out = _lower_resolution(out, style.resolution_factor)
    if style.noise_std > 0:
        out = out + style.noise_std * rng.standard_normal(out.shape, dtype=np.float32)
    return out.astype(np.float32)


def _to_png_levels(image: np.ndarray) -> np.ndarray:
    lo, hi = PNG_INTENSITY_WINDOW
    scaled = (np.clip(image, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def _clear_previous_cases(folder: Path, prefix: str) -> None:
    # Stale cases of an earlier, larger run would be picked up by loaders that list
    # the folder; only files this module names are removed.
    if folder.is_dir():
        for path in folder.glob(f"{prefix}_*"):
            if path.is_file():
                path.unlink()


def write_synthetic_federation(
    root: Path,
    num_sites: int = 3,
    cases_per_site: int = 24,
    shape: tuple[int, ...] = (96, 96),
    seed: int = 0,
    styles: Sequence[SiteStyle] | None = None,
) -> list[Path]:
    """Write one Decathlon-layout folder per synthetic site.

    Each site gets its own patients (anatomy drawn from ``seed``, the site's index
    and the case's index) rendered in the site's style. 2D cases are grey 8-bit PNG
    images, mapped with the fixed :data:`PNG_INTENSITY_WINDOW` so site differences
    survive, with PNG labels of 0 and 255. 3D cases are float32 NIfTI images and
    uint8 NIfTI labels of 0 and 1 with 1 mm isotropic spacing.

    Parameters
    ----------
    root : pathlib.Path
        Folder under which ``<site-name>/`` folders are created.
    num_sites : int
        Number of sites; at least 1.
    cases_per_site : int
        Training cases per site; at least 1.
    shape : tuple of int
        Image shape: 2 sides for 2D, 3 for 3D, each at least 16.
    seed : int
        Non-negative seed; the same seed writes byte-identical files.
    styles : sequence of SiteStyle, optional
        One style per site with distinct names; defaults to
        :func:`default_site_styles`.

    Returns
    -------
    list of pathlib.Path
        The site folders, in site order.

    """
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise ValueError(f"num_sites must be an integer >= 1, got {num_sites!r}")
    if (
        isinstance(cases_per_site, bool)
        or not isinstance(cases_per_site, int)
        or cases_per_site < 1
    ):
        raise ValueError(f"cases_per_site must be an integer >= 1, got {cases_per_site!r}")
    shape = _check_shape(shape)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    chosen = list(styles) if styles is not None else default_site_styles(num_sites)
    if len(chosen) != num_sites:
        raise ValueError(f"got {len(chosen)} site styles for num_sites={num_sites}; pass one each")
    names = [s.name for s in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"site style names must be distinct, got {names}")

    is_3d = len(shape) == 3
    ext = "nii.gz" if is_3d else "png"
    root = Path(root)
    folders = []
    for site_index, style in enumerate(chosen):
        folder = root / style.name
        images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
        for sub in (images_dir, labels_dir):
            _clear_previous_cases(sub, style.name)
            sub.mkdir(parents=True, exist_ok=True)
        training = []
        for case in range(cases_per_site):
            anatomy, label = make_phantom(
                np.random.default_rng([seed, site_index, case, 0]), shape
            )
            image = render_site(anatomy, style, np.random.default_rng([seed, site_index, case, 1]))
            case_id = f"{style.name}_{case:03d}"
            image_path = images_dir / f"{case_id}.{ext}"
            label_path = labels_dir / f"{case_id}.{ext}"
            if is_3d:
                _write_nifti(image_path, image.astype(np.float32))
                _write_nifti(label_path, label.astype(np.uint8))
            else:
                Image.fromarray(_to_png_levels(image)).save(image_path)
                Image.fromarray(label * np.uint8(255)).save(label_path)
            training.append(
                {"image": f"./imagesTr/{case_id}.{ext}", "label": f"./labelsTr/{case_id}.{ext}"}
            )
        style_text = ", ".join(f"{k}={v}" for k, v in asdict(style).items() if k != "name")
        dataset = {
            "name": style.name,
            "description": f"Synthetic phantom organ segmentation (fedseg simulations); "
            f"seed={seed}; scanner style: {style_text}",
            "tensorImageSize": "3D" if is_3d else "2D",
            "modality": {"0": "synthetic"},
            "labels": {"0": "background", "1": "organ"},
            "numTraining": cases_per_site,
            "numTest": 0,
            "training": training,
            "test": [],
        }
        (folder / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
        folders.append(folder)
    return folders


def _write_nifti(path: Path, array: np.ndarray) -> None:
    # 1 mm isotropic voxels in scanner space; nibabel writes gzip with a zero
    # timestamp, so the same array gives the same bytes.
    image = nib.Nifti1Image(array, np.eye(4))
    image.header.set_xyzt_units("mm")
    image.set_qform(np.eye(4), code=1)
    image.set_sform(np.eye(4), code=1)
    nib.save(image, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Write a synthetic federation from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.phantoms",
        description="Write synthetic multi-site segmentation data (Decathlon layout).",
    )
    parser.add_argument("root", type=Path, help="output folder; one sub-folder per site")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--cases", type=int, default=24, help="cases per site")
    parser.add_argument("--shape", default="96,96", help="e.g. 96,96 or 32,32,32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(s) for s in args.shape.replace("x", ",").split(",") if s.strip())
        folders = write_synthetic_federation(args.root, args.sites, args.cases, shape, args.seed)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    for folder in folders:
        print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
