"""Whole-image prediction by sliding-window inference (MONAI), at the image's resolution."""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from client.preprocess import resize_image, resize_logits


@torch.no_grad()
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
    numpy.ndarray
        ``int64`` class indices of shape ``image.shape[1:]``.
    """
    net.eval()
    work = resize_image(image, resize) if resize else image
    x = torch.from_numpy(np.ascontiguousarray(work))[None].to(device)
    logits = sliding_window_inference(
        x, roi_size=patch_size, sw_batch_size=sw_batch_size, predictor=net,
        overlap=overlap, mode="gaussian",
    )
    assert isinstance(logits, torch.Tensor)
    logits = resize_logits(logits, image.shape[1:])
    return logits.argmax(dim=1)[0].cpu().numpy().astype(np.int64)
