"""Public synthetic anatomy for pretraining a starting model: lung fields and retinal vessels.

The sites' images are private, so a starting model for DP fine-tuning is trained
on data every party may see. These two families are drawn from a handful of
geometric rules and random numbers only; no real image, label or statistic of a
site went into them (the shapes and intensity levels are textbook anatomy,
written down by hand):

* ``lung``: a frontal chest radiograph, 256x256 grey: a bright thorax and
  abdomen on dark air, two dark lung fields with vessel markings, the heart
  shadow cutting into the left lung (the label excludes it, as lung-field masks
  do), ribs, clavicles and spine as bright bands, blur and noise. The label is
  both lung fields.
* ``vessel``: a colour fundus photograph, 576x576 RGB: an orange-red circular
  field of view on a black frame, darker rim, a bright optic disc and a dark
  macula, and branching vessel trees that leave the disc, arch around the macula
  and thin at every branching, down to one pixel; sometimes bright or dark
  lesions that are not vessels. The label is every vessel.

:func:`write_family_site` writes one Decathlon-layout folder (PNG images and
0/255 labels) that goes through the same data contract as a site's data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import interpolate, ndimage

Generator = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]
"""``rng -> (image, label)``: float image in [0, 1] (H, W) or (H, W, 3); uint8 0/1 label."""


# --- lung fields in a chest radiograph -------------------------------------------------

LUNG_SIDE = 256
# One lung field (the patient's right, on the image's left) as points in image
# fractions (x from the left, y from the top), clockwise from the apex; the other
# lung is its mirror image with the heart cutting into its lower medial edge.
_RIGHT_LUNG = np.array([
    (0.34, 0.14), (0.40, 0.20), (0.43, 0.32), (0.44, 0.48), (0.44, 0.64), (0.43, 0.76),
    (0.33, 0.74), (0.22, 0.78), (0.13, 0.84), (0.11, 0.70), (0.12, 0.50), (0.16, 0.32),
    (0.23, 0.19),
])


def _smooth_polygon(points: np.ndarray, samples: int = 200) -> np.ndarray:
    """Return a closed periodic spline through ``points`` (N, 2), sampled densely."""
    closed = np.vstack([points, points[:1]])
    tck, _ = interpolate.splprep([closed[:, 0], closed[:, 1]], s=0, per=True)
    x, y = interpolate.splev(np.linspace(0, 1, samples), tck)
    return np.stack([x, y], axis=1)


def _fill(polygon: np.ndarray, shape: tuple[int, int], scale: int = 2) -> np.ndarray:
    """Rasterise a polygon given in pixels; return its coverage in [0, 1] (anti-aliased)."""
    height, width = shape
    canvas = Image.new("L", (width * scale, height * scale), 0)
    ImageDraw.Draw(canvas).polygon([(float(x) * scale, float(y) * scale) for x, y in polygon],
                                   fill=255)
    big = np.asarray(canvas, dtype=np.float32) / 255.0
    return big.reshape(height, scale, width, scale).mean(axis=(1, 3))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    std = float(field.std())
    return field / std if std > 0 else field


def _band(xx: np.ndarray, yy: np.ndarray, centre: Callable[[np.ndarray], np.ndarray],
          half_width: float) -> np.ndarray:
    """Return a soft band of ``half_width`` around the curve ``y = centre(x)``."""
    distance = np.abs(yy - centre(xx))
    return np.clip(1.0 - distance / half_width, 0.0, 1.0) ** 0.5


def lung_phantom(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic frontal chest radiograph and its lung-field mask.

    Returns
    -------
    image : numpy.ndarray
        float32 (256, 256) in [0, 1]; air dark, bone and soft tissue bright.
    label : numpy.ndarray
        uint8 (256, 256): 1 on both lung fields, 0 elsewhere (the heart shadow too).
    """
    side = LUNG_SIDE
    shape = (side, side)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    # Patient size and position: scale about the image centre, shift, slight tilt.
    # Patient size relative to the film varies a lot: small patients leave wide air.
    scale = np.array([rng.uniform(0.7, 1.1), 0.0])
    scale[1] = scale[0] * rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.05, 0.05, size=2) + np.array([0.0, rng.uniform(-0.02, 0.06)])
    tilt = rng.uniform(-0.06, 0.06)
    rotation = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])

    def place(points: np.ndarray) -> np.ndarray:
        centred = (points - 0.5) * scale
        return (centred @ rotation.T + 0.5 + shift) * side

    right = _RIGHT_LUNG + rng.normal(0, 0.012, _RIGHT_LUNG.shape)
    left = np.column_stack([1.0 - _RIGHT_LUNG[:, 0], _RIGHT_LUNG[:, 1]])
    left = left + rng.normal(0, 0.012, left.shape)
    right_cover = _fill(place(_smooth_polygon(right)), shape)
    left_cover = _fill(place(_smooth_polygon(left)), shape)
    # The heart: a tilted ellipse low in the middle, bulging into the left lung.
    heart_centre = place(np.array([[0.55 + rng.uniform(-0.01, 0.04),
                                    0.70 + rng.uniform(-0.03, 0.03)]]))[0] / side
    heart_radii = np.array([rng.uniform(0.15, 0.21), rng.uniform(0.11, 0.15)]) * scale
    angle = rng.uniform(0.2, 0.6)
    dx, dy = xx - heart_centre[0], yy - heart_centre[1]
    u = (dx * math.cos(angle) + dy * math.sin(angle)) / heart_radii[0]
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) / heart_radii[1]
    heart = np.clip((1.0 - (u * u + v * v)) * 4.0, 0.0, 1.0)
    lungs = np.clip(right_cover + left_cover, 0.0, 1.0) * (1.0 - heart)
    label = (lungs >= 0.5).astype(np.uint8)

    # Body: the chest wall just outside the lungs, the neck above, dark air around
    # (large and black on some films: air is as dark as the lungs, but not lung).
    across = np.abs(xx - 0.5 - shift[0])
    wall = rng.uniform(0.42, 0.48) * scale[0] + rng.uniform(0.0, 0.08) * np.clip(yy - 0.3, 0,
                                                                               None)
    shoulders = np.clip((yy - (0.1 + shift[1])) * 12.0, 0.0, 1.0)
    body = np.clip((wall - across) * 40.0, 0.0, 1.0) * shoulders
    body = np.maximum(body, np.clip((0.1 - across) * 40.0, 0.0, 1.0) * (yy > 0.02))
    for sign in (-1.0, 1.0):  # arms beside the chest on some films
        if rng.random() < 0.5:
            arm = np.abs(sign * (xx - 0.5 - shift[0]) - wall - rng.uniform(0.05, 0.08))
            body = np.maximum(body, np.clip((0.04 - arm) * 40.0, 0.0, 1.0)
                              * (yy > rng.uniform(0.05, 0.2)) * rng.uniform(0.5, 0.9))
    body = ndimage.gaussian_filter(body, 3.0)
    tissue = rng.uniform(0.55, 0.7) + 0.05 * _smooth_noise(rng, shape, 12.0)
    image = rng.uniform(0.0, 0.12) + body * (tissue - 0.05)
    # Lung fields are dark: less tissue in the beam, brighter towards the base.
    depth = rng.uniform(0.3, 0.45) * (1.0 - 0.35 * np.clip((yy - 0.3) / 0.5, 0.0, 1.0))
    soft_lungs = ndimage.gaussian_filter(lungs, rng.uniform(1.0, 2.5))
    image = image - depth * soft_lungs
    # Lung markings: thin bright ridges of smooth noise, denser near the hila.
    ridges = 1.0 - np.abs(_smooth_noise(rng, shape, 2.0))
    image += 0.06 * soft_lungs * np.clip(ridges, 0, None) ** 3
    # Spine, ribs and clavicles: bright bands.
    image += rng.uniform(0.05, 0.12) * np.clip(1.0 - np.abs(xx - 0.5 - shift[0]) / 0.04, 0,
                                                None) * (yy > 0.05)
    first_rib = 0.14 + shift[1] + rng.uniform(-0.02, 0.02)
    spacing = rng.uniform(0.06, 0.08) * scale[1]
    rib_level = rng.uniform(0.05, 0.11)
    for side_sign in (-1.0, 1.0):
        lateral = np.clip(side_sign * (xx - 0.5 - shift[0]), 0, None)
        beside_spine = np.clip((lateral - 0.03) / 0.03, 0.0, 1.0)
        for k in range(9):
            y0 = first_rib + k * spacing
            # Posterior ribs rise from the spine, then arch down at the chest wall.
            slope, bend = rng.uniform(0.3, 0.55), rng.uniform(1.4, 2.4)

            def centre(x: np.ndarray, y0: float = y0, slope: float = slope,
                       bend: float = bend) -> np.ndarray:
                return y0 - slope * x + bend * x * x

            rib = _band(lateral, yy, centre, rng.uniform(0.011, 0.018))
            image += rib_level * rib * body * beside_spine * (lateral < 0.46 * scale[0])
        clavicle = _band(lateral, yy, lambda x: 0.11 + shift[1] - 0.08 * x, 0.014)
        image += 0.12 * clavicle * (lateral < 0.3) * (lateral > 0.03)
    image += 0.05 * heart
    # Collimation: black bands at the film's edges; bright burnt-in text markers.
    if rng.random() < 0.6:
        image[yy > rng.uniform(0.82, 0.97)] = rng.uniform(0.0, 0.03)
    for edge in (xx < rng.uniform(0.0, 0.08), xx > rng.uniform(0.92, 1.0)):
        if rng.random() < 0.4:
            image[edge] = rng.uniform(0.0, 0.03)
    for _ in range(rng.integers(0, 3)):
        x0, y0 = rng.uniform(0.02, 0.85), rng.uniform(0.01, 0.12)
        image[(xx > x0) & (xx < x0 + rng.uniform(0.03, 0.12)) & (yy > y0)
              & (yy < y0 + rng.uniform(0.02, 0.05))] = rng.uniform(0.8, 1.0)
    # Scanner: contrast curve, blur, noise.
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.7, 1.4)
    image = ndimage.gaussian_filter(image, rng.uniform(0.3, 1.2))
    image = image + rng.uniform(0.005, 0.03) * rng.standard_normal(shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


# --- vessels in a colour fundus photograph ---------------------------------------------

VESSEL_SIDE = 576


@dataclass
class _Branch:
    x: float
    y: float
    angle: float
    width: float
    length: float
    heading: float  # the direction the branch's arcade drifts towards


def _vessel_tree(rng: np.random.Generator, disc: np.ndarray, macula: np.ndarray,
                 radius: float, centre: np.ndarray, scale: int
                 ) -> list[tuple[tuple[float, float], tuple[float, float], float]]:
    """Grow branching vessels from the disc; return line segments (start, end, width)."""
    segments: list[tuple[tuple[float, float], tuple[float, float], float]] = []
    to_macula = math.atan2(macula[1] - disc[1], macula[0] - disc[0])
    # Four arcades leave the disc: two arch above and below the macula, two go nasally.
    starts = [to_macula - 1.2, to_macula + 1.2, to_macula + math.pi - 0.8,
              to_macula + math.pi + 0.8]
    stack = []
    for i, angle in enumerate(starts):
        for _ in range(2):  # an artery and a vein side by side
            stack.append(_Branch(disc[0], disc[1], angle + rng.normal(0, 0.15),
                                 rng.uniform(5.0, 8.0) if i < 2 else rng.uniform(4.0, 6.0),
                                 0.0, to_macula if i < 2 else to_macula + math.pi))
    step = 3.0
    while stack and len(segments) < 25000:
        b = stack.pop()
        while b.width >= 0.7:
            # Vessels run away from the disc and bend around the macula, so the
            # temporal arcades arch above and below it and never cross it.
            outward = math.atan2(b.y - disc[1], b.x - disc[0])
            away = math.atan2(b.y - macula[1], b.x - macula[0])
            gap = math.hypot(b.x - macula[0], b.y - macula[1]) / radius
            turn = (rng.normal(0, 0.05) + 0.01 * math.sin(outward - b.angle)
                    + 0.025 * math.sin(b.heading - b.angle))
            if gap < 0.4:
                turn += 0.06 * math.sin(away - b.angle)
            b.angle += turn
            nx, ny = b.x + step * math.cos(b.angle), b.y + step * math.sin(b.angle)
            if math.hypot(nx - centre[0], ny - centre[1]) > radius * 1.02:
                break
            segments.append(((b.x * scale, b.y * scale), (nx * scale, ny * scale), b.width))
            b.x, b.y, b.length = nx, ny, b.length + step
            b.width *= 0.997
            if b.length > rng.uniform(15, 45) and rng.random() < 0.06:
                child = b.width * rng.uniform(0.35, 0.75)
                side = 1.0 if rng.random() < 0.5 else -1.0
                stack.append(_Branch(b.x, b.y, b.angle + side * rng.uniform(0.5, 1.1),
                                     child, 0.0, b.angle + side * 0.8))
                b.width *= rng.uniform(0.8, 0.92)
                b.angle -= side * rng.uniform(0.05, 0.25)
                b.length = 0.0
            if b.width < 2.0 and b.length > 120 and rng.random() < 0.01:
                break
    return segments


def vessel_phantom(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic colour fundus photograph and its vessel mask.

    Returns
    -------
    image : numpy.ndarray
        float32 (576, 576, 3) RGB in [0, 1], black outside the circular field of view.
    label : numpy.ndarray
        uint8 (576, 576): 1 on vessels, 0 elsewhere.
    """
    side = VESSEL_SIDE
    shape = (side, side)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    centre = np.array([side / 2, side / 2]) + rng.uniform(-8, 8, size=2)
    radius = side * rng.uniform(0.44, 0.49)
    dist = np.hypot(xx - centre[0], yy - centre[1]) / radius
    fov = np.clip((1.0 - dist) * radius / rng.uniform(0.5, 2.0), 0.0, 1.0)
    eye = 1.0 if rng.random() < 0.5 else -1.0  # left or right eye: disc on either side
    disc = centre + np.array([eye * radius * rng.uniform(0.3, 0.42), rng.uniform(-0.08, 0.08)
                              * radius])
    macula = centre + np.array([-eye * radius * rng.uniform(0.0, 0.08),
                                rng.uniform(-0.05, 0.05) * radius])

    # Vessels: drawn at 3x and averaged down, so thin ones get partial coverage.
    scale = 3
    canvas = Image.new("L", (side * scale, side * scale), 0)
    draw = ImageDraw.Draw(canvas)
    for start, end, width in _vessel_tree(rng, disc, macula, radius, centre, scale):
        w = max(1, round(width * scale))
        draw.line([start, end], fill=255, width=w)
        r = w / 2
        draw.ellipse([end[0] - r, end[1] - r, end[0] + r, end[1] + r], fill=255)
    coverage = np.asarray(canvas, dtype=np.float32).reshape(side, scale, side, scale)
    coverage = coverage.mean(axis=(1, 3)) / 255.0 * (dist < 1.0)
    label = (coverage >= 0.5).astype(np.uint8)

    # Fundus: orange-red, darker towards the rim, a bright disc and a dark macula.
    base = np.array([rng.uniform(0.65, 0.95), rng.uniform(0.28, 0.5), rng.uniform(0.05, 0.2)])
    # Vignetting, a darker rim, uneven illumination and fine choroidal texture.
    shade = (1.0 - rng.uniform(0.1, 0.45) * dist ** 2 - rng.uniform(0.1, 0.5) * dist ** 12
             + rng.uniform(0.0, 0.15) * ((xx - centre[0]) * rng.normal() + (yy - centre[1])
                                         * rng.normal()) / radius
             + rng.uniform(0.01, 0.04) * _smooth_noise(rng, shape, 30.0)
             + rng.uniform(0.005, 0.025) * _smooth_noise(rng, shape, 1.5))
    image = base[None, None, :] * shade[..., None]
    disc_radius = radius * rng.uniform(0.09, 0.13)
    disc_glow = np.exp(-(np.hypot(xx - disc[0], yy - disc[1]) / disc_radius) ** 4)
    image += disc_glow[..., None] * np.array([0.25, 0.35, 0.2]) * rng.uniform(0.5, 1.0)
    macula_dark = np.exp(-(np.hypot(xx - macula[0], yy - macula[1]) / (radius * 0.15)) ** 2)
    image *= 1.0 - rng.uniform(0.1, 0.3) * macula_dark[..., None]
    # Lesions some eyes have (exudates bright, haemorrhages dark): not vessels.
    for _ in range(rng.poisson(1.5)):
        where = centre + rng.uniform(-0.7, 0.7, size=2) * radius
        size = rng.uniform(3, 12)
        spot = np.exp(-(np.hypot(xx - where[0], yy - where[1]) / size) ** 2)
        tint = (np.array([0.3, 0.3, 0.05]) if rng.random() < 0.5
                else -np.array([0.3, 0.25, 0.05]))
        image += spot[..., None] * tint
    # Vessels absorb most in green; contrast varies from eye to eye and camera to camera.
    contrast = np.array([rng.uniform(0.03, 0.18), rng.uniform(0.12, 0.42),
                         rng.uniform(0.05, 0.3)])
    soft = ndimage.gaussian_filter(coverage, 0.6)
    image *= 1.0 - contrast[None, None, :] * soft[..., None]
    image = ndimage.gaussian_filter(image, (rng.uniform(0.4, 1.2),) * 2 + (0,))
    image += rng.uniform(0.005, 0.025) * rng.standard_normal(image.shape)
    image *= fov[..., None]
    # The frame is not exactly black: a camera's dark level, noise and compression.
    frame = rng.uniform(0.0, 0.06) + rng.uniform(0.005, 0.03) * rng.standard_normal(shape)
    image += ((1.0 - fov) * np.clip(frame, 0.0, None))[..., None]
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    return image.astype(np.float32), label


FAMILIES: dict[str, Generator] = {"lung": lung_phantom, "vessel": vessel_phantom}
"""Every public phantom family by name."""


def write_family_site(root: Path, family: str, cases: int, seed: int = 0) -> Path:
    """Write ``cases`` phantoms of ``family`` as one Decathlon-layout site under ``root``.

    Case ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so the same
    seed writes the same images. Images are 8-bit PNG (grey or RGB), labels 0/255.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown phantom family {family!r}; choose one of "
                         f"{', '.join(FAMILIES)}")
    folder = Path(root) / f"public-{family}"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(cases):
        image, label = FAMILIES[family](np.random.default_rng([seed, i]))
        name = f"{family}_{i:04d}.png"
        Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(folder / "imagesTr" / name)
        Image.fromarray(label * np.uint8(255)).save(folder / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    dataset = {"name": f"public-{family}", "description": f"fedseg synthetic {family} "
               f"phantoms, seed {seed} (simulations/phantom_families.py)",
               "labels": {"0": "background", "1": family}, "numTraining": cases,
               "training": training}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return folder
