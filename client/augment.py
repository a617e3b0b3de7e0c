"""The training pipeline on MONAI transforms: foreground-aware crops and augmentation.

Two families of augmentation: spatial (flips, 90-degree rotations, a small affine)
so that a few dozen cases look like more, and intensity (contrast, gamma, scale and
shift, noise, blur, histogram shift) that mimics another scanner or protocol, which
is the shift a model meets at the next hospital. The deterministic part (padding,
foreground and background indices) is cached once per dataset; only the random part
runs per draw.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, set_track_meta
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    FgBgToIndicesd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from torch.utils.data import Dataset

KEYS = ("image", "label")

# MetaTensor bookkeeping made each draw ten times slower on a CPU (measured: 120 ms
# against 12 ms for a 96x96 patch); training needs no affine or transform history.
set_track_meta(False)
# RandHistogramShift warns on every patch of one intensity (a crop of a fundus
# photograph's black frame) and returns it unchanged, which is right for it: the
# site logs filled with that line alone. Only that message is silenced.
warnings.filterwarnings("ignore", message="The image's intensity is a single value",
                        category=UserWarning)


def _indices(num_classes: int) -> Any:
    """Return the transform that finds the crop centres, run once per case (cached)."""
    if num_classes > 2:
        return ClassesToIndicesd("label", num_classes=num_classes)
    return FgBgToIndicesd("label")


def _crop(patch_size: tuple[int, ...], num_classes: int) -> Any:
    if num_classes > 2:
        # Centred on each class as often (background included), as nnU-Net
        # oversamples: a small structure beside a large one is otherwise rarely
        # seen. A class a case lacks is skipped for that case.
        return RandCropByLabelClassesd(
            KEYS, label_key="label", spatial_size=patch_size, ratios=[1] * num_classes,
            num_classes=num_classes, num_samples=1, indices_key="label_cls_indices",
            allow_smaller=False, warn=False)
    # Half the patches centred on foreground: thin vessels and a small atrium
    # are otherwise rarely seen.
    return RandCropByPosNegLabeld(
        KEYS, label_key="label", spatial_size=patch_size, pos=1.0, neg=1.0, num_samples=1,
        fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices",
        allow_smaller=False)


def _spatial(patch_size: tuple[int, ...], whole_image: bool, num_classes: int) -> list[Any]:
    dims = len(patch_size)
    steps: list[Any] = []
    if not whole_image:
        steps.append(_crop(patch_size, num_classes))
        steps += [RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(dims)]
        if patch_size[0] == patch_size[1]:
            # A quarter turn swaps the two axes: only a square patch keeps its shape,
            # and a batch needs one shape (a 56x64x40 patch would stack with 64x56x40).
            steps.append(RandRotate90d(KEYS, prob=0.5, spatial_axes=(0, 1)))
    steps.append(RandAffined(
        KEYS, prob=0.2, rotate_range=(0.26,) if dims == 2 else (0.26, 0.0, 0.0),
        scale_range=0.1, mode=("bilinear", "nearest"), padding_mode="zeros"))
    return steps


def _intensity() -> list[Any]:
    return [
        RandScaleIntensityd("image", factors=0.15, prob=0.5),
        RandShiftIntensityd("image", offsets=0.15, prob=0.5),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
        RandHistogramShiftd("image", num_control_points=8, prob=0.1),
        RandGaussianNoised("image", std=0.05, prob=0.15),
        RandGaussianSmoothd("image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0),
                            sigma_z=(0.25, 1.0), prob=0.1),
    ]


class PatchDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One augmented patch of a case per draw (:class:`UnitDataset` groups them).

    Parameters
    ----------
    images, labels : sequence of numpy.ndarray
        ``(C, *spatial)`` float32 images and ``(*spatial)`` int64 class maps.
    patch_size : tuple of int
        Training patch; a case smaller than it is padded.
    seed : int
        Seed of every random transform, so a round is reproducible.
    whole_image : bool
        The images already have the patch's size: no crop, no 90-degree turns
        (anatomy such as a chest has an up and a down).
    augment : bool
        Spatial and intensity augmentation; off gives plain crops.
    num_classes : int
        Classes of the labels: with more than 2, crops centre on each class alike.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                 patch_size: tuple[int, ...], seed: int, whole_image: bool = False,
                 augment: bool = True, num_classes: int = 2) -> None:
        prepare = Compose([SpatialPadd(KEYS, spatial_size=patch_size),
                           *([] if whole_image else [_indices(num_classes)])])
        random = [*_spatial(patch_size, whole_image, num_classes)] if augment else (
            [] if whole_image else [_crop(patch_size, num_classes)])
        if augment:
            random += _intensity()
        self.random = Compose(random)
        self.reseed(seed)
        items = [{"image": img, "label": lab[None]} for img, lab in
                 zip(images, labels, strict=True)]
        self.cache = CacheDataset(items, transform=prepare, progress=False, num_workers=0,
                                  copy_cache=False)

    def reseed(self, seed: int) -> None:
        """Restart every random transform from ``seed`` (one seed per round)."""
        self.random.set_random_state(seed=seed % (2 ** 32))

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item: Mapping[str, Any] = dict(self.cache[index])
        out = self.random(item)
        if isinstance(out, list):
            out = out[0]
        image = torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32)
        label = torch.as_tensor(np.asarray(out["label"]), dtype=torch.int64)
        return image.contiguous(), label.contiguous()


class UnitDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Sampling units: item ``u`` is ``draws`` augmented patches of unit ``u``'s cases.

    Under DP-SGD a unit is a patient and ``draws`` is the augmentation
    multiplicity: Poisson sampling picks patients, and all of a patient's patches
    give one gradient together, so a patient with two scans is protected as one
    person. Plain training uses one unit per case and one draw.

    Parameters
    ----------
    patches : PatchDataset
        The cases' patches, already seeded for the round.
    units : sequence of sequence of int
        Each unit's case indices into ``patches``; none may be empty.
    draws : int
        Patches per unit and item: the unit's cases in turn, from a random one,
        so every case of a unit is drawn when ``draws`` is at least their number.
    seed : int
        Seed of the starting case of each draw.
    """

    def __init__(self, patches: PatchDataset, units: Sequence[Sequence[int]], draws: int,
                 seed: int) -> None:
        if draws < 1 or any(not cases for cases in units):
            raise ValueError("UnitDataset needs draws >= 1 and at least one case per unit")
        self.patches = patches
        self.units = [tuple(cases) for cases in units]
        self.draws = draws
        self.rng = np.random.default_rng(seed % (2 ** 32))

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cases = self.units[index]
        first = int(self.rng.integers(len(cases))) if len(cases) > 1 else 0
        pairs = [self.patches[cases[(first + j) % len(cases)]] for j in range(self.draws)]
        return (torch.stack([image for image, _ in pairs]),
                torch.stack([label for _, label in pairs]))
