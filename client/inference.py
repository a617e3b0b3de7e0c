"""Whole-image prediction by sliding-window inference (MONAI), at the image's resolution.

:func:`predict_classes` gives the mask; :func:`predict_with_uncertainty` gives a
mask averaged over flipped copies of the image and a per-voxel uncertainty map.
Both run the network through :func:`predict_logits`, so they tile, blend and
resample an image identically.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from client.preprocess import resize_image, resize_logits


@torch.no_grad()
def predict_logits(
    net: nn.Module,
    image: np.ndarray,
    patch_size: tuple[int, ...],
    device: torch.device,
    resize: tuple[int, ...] = (),
    sw_batch_size: int = 4,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Return the logits of one channel-first image at full resolution.

    Parameters
    ----------
    net : torch.nn.Module
        Segmentation network (put into eval mode here).
    image : numpy.ndarray
        ``(C, *spatial)`` float32 image, normalised as for training.
    patch_size : tuple of int
        Window size; images smaller than it are padded and cropped back.
    device : torch.device
        Where to run the network.
    resize : tuple of int
        The planned working size (``()``: native). The image is resampled to it,
        and the logits back to the image's own size, so the mask and its Dice are
        always at full resolution.
    sw_batch_size : int
        Windows per forward pass.
    overlap : float
        Window overlap; Gaussian blending hides seams.

    Returns
    -------
    torch.Tensor
        ``(1, num_classes, *image.shape[1:])`` float logits on ``device``.
    """
    net.eval()
    work = resize_image(image, resize) if resize else image
    x = torch.from_numpy(np.ascontiguousarray(work))[None].to(device)
    logits = sliding_window_inference(
        x, roi_size=patch_size, sw_batch_size=sw_batch_size, predictor=net,
        overlap=overlap, mode="gaussian",
    )
    assert isinstance(logits, torch.Tensor)
    return resize_logits(logits, image.shape[1:])


def predict_classes(
    net: nn.Module,
    image: np.ndarray,
    patch_size: tuple[int, ...],
    device: torch.device,
    resize: tuple[int, ...] = (),
    sw_batch_size: int = 4,
    overlap: float = 0.25,
) -> np.ndarray:
    """Return the class map of one channel-first image at full resolution.

    The argmax of :func:`predict_logits` (same parameters).

    Returns
    -------
    numpy.ndarray
        ``int64`` class indices of shape ``image.shape[1:]``.
    """
    # Argmax of the logits, not of their softmax: float32 softmax can round two close
    # logits to one probability, and masks must not change with this refactoring.
    logits = predict_logits(net, image, patch_size, device, resize, sw_batch_size, overlap)
    return logits.argmax(dim=1)[0].cpu().numpy().astype(np.int64)


def predict_probabilities(
    net: nn.Module,
    image: np.ndarray,
    patch_size: tuple[int, ...],
    device: torch.device,
    resize: tuple[int, ...] = (),
    sw_batch_size: int = 4,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Return the softmax of :func:`predict_logits` (same parameters).

    Returns
    -------
    torch.Tensor
        ``(num_classes, *image.shape[1:])`` float32 class probabilities on ``device``.
    """
    logits = predict_logits(net, image, patch_size, device, resize, sw_batch_size, overlap)
    return torch.softmax(logits.float(), dim=1)[0]


def flip_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """Return every combination of spatial axes to flip, the identity ``()`` first.

    4 combinations in 2D, 8 in 3D; axes are counted from 0 over the spatial axes.
    """
    axes = range(spatial_dims)
    return [combo for k in range(spatial_dims + 1) for combo in itertools.combinations(axes, k)]


def normalized_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Return the predictive entropy of ``(K, *spatial)`` probabilities, divided by log K.

    0 where one class has all the probability, 1 where all K classes are equally
    likely, whatever K is.
    """
    num_classes = probabilities.shape[0]
    p = probabilities.clamp_min(0.0)
    # 0 * log 0 is 0 by continuity; xlogy gives that without a NaN.
    entropy = -torch.special.xlogy(p, p).sum(dim=0)
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


@dataclass(frozen=True)
class UncertainPrediction:
    """A mask with its per-voxel uncertainty, both at the image's full resolution.

    Attributes
    ----------
    classes : numpy.ndarray
        ``int64`` class indices: the argmax of the probabilities averaged over
        every flipped pass.
    uncertainty : numpy.ndarray
        ``float32`` predictive entropy of those averaged probabilities, divided
        by log(num_classes), in ``[0, 1]``.
    passes : int
        Forward passes averaged (4 in 2D, 8 in 3D).
    """

    classes: np.ndarray
    uncertainty: np.ndarray
    passes: int


def predict_with_uncertainty(
    net: nn.Module,
    image: np.ndarray,
    patch_size: tuple[int, ...],
    device: torch.device,
    resize: tuple[int, ...] = (),
    sw_batch_size: int = 4,
    overlap: float = 0.25,
) -> UncertainPrediction:
    """Predict by test-time augmentation with flips and measure where the passes disagree.

    The image is flipped along every combination of spatial axes, each copy goes
    through :func:`predict_probabilities` (same parameters), and its
    probabilities are flipped back and averaged. A flip is its own exact
    inverse, so every pass lands on the original voxel grid without
    interpolation. The uncertainty is the normalised predictive entropy of the
    average (:func:`normalized_entropy`): it grows where the network is unsure
    in each pass and where the passes disagree.

    Returns
    -------
    UncertainPrediction
        The averaged mask, the uncertainty map and the number of passes.
    """
    spatial_dims = image.ndim - 1
    combos = flip_axes(spatial_dims)
    total: torch.Tensor | None = None
    for axes in combos:
        flipped = np.flip(image, axis=tuple(a + 1 for a in axes)) if axes else image
        probabilities = predict_probabilities(net, flipped, patch_size, device, resize,
                                              sw_batch_size, overlap)
        if axes:
            probabilities = torch.flip(probabilities, dims=[a + 1 for a in axes])
        total = probabilities if total is None else total + probabilities
    assert total is not None
    mean = total / len(combos)
    return UncertainPrediction(
        classes=mean.argmax(dim=0).cpu().numpy().astype(np.int64),
        uncertainty=normalized_entropy(mean).cpu().numpy().astype(np.float32),
        passes=len(combos),
    )
