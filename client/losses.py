"""The training loss, one value per patch.

MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` averages over the batch
before it returns. DP-SGD needs each sampling unit's own loss (its gradient is
clipped on its own), so the same loss is written here per patch: Dice over the
classes (MONAI's smoothing, background included) plus the pixel-mean cross
entropy. The mean over a batch equals MONAI's value; plain training takes that
mean, DP-SGD the mean over each unit's patches. Written with comparisons instead
of ``one_hot`` so that ``torch.func.vmap`` can batch it over units.
"""

from __future__ import annotations

import torch

SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr and smooth_dr


def patch_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return Dice + cross-entropy of each patch.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, classes, *spatial)`` network output.
    labels : torch.Tensor
        ``(N, 1, *spatial)`` integer class map.

    Returns
    -------
    torch.Tensor
        ``(N,)`` losses; their mean is MONAI's ``DiceCELoss`` of the batch.
    """
    classes = logits.shape[1]
    spatial = tuple(range(2, logits.dim()))
    ids = torch.arange(classes, device=labels.device).view(1, classes, *(1,) * len(spatial))
    target = (labels == ids).to(logits.dtype)
    probs = logits.softmax(1)
    intersection = (probs * target).sum(spatial)
    denominator = probs.sum(spatial) + target.sum(spatial)
    dice = 1.0 - (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)
    cross_entropy = -(logits.log_softmax(1) * target).sum(1).flatten(1).mean(1)
    return dice.mean(1) + cross_entropy
