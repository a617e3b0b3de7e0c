"""Segmentation metrics on label arrays (pure NumPy)."""

from __future__ import annotations

import numpy as np


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Return the Dice score of every foreground class for one case.

    Parameters
    ----------
    pred, target : numpy.ndarray
        Integer class maps of identical shape.
    num_classes : int
        Number of classes including background (class 0, which is not scored).

    Returns
    -------
    numpy.ndarray
        ``num_classes - 1`` scores in [0, 1]. A class absent from both the
        prediction and the reference scores 1.0 (nothing to find, nothing found).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {target.shape}")
    scores = np.empty(num_classes - 1, dtype=np.float64)
    for c in range(1, num_classes):
        p = pred == c
        t = target == c
        denom = int(p.sum()) + int(t.sum())
        scores[c - 1] = 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom
    return scores


def case_dice(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Return the mean foreground Dice of one case."""
    return float(dice_per_class(pred, target, num_classes).mean())


def weighted_mean(values: list[float], weights: list[float]) -> float:
    """Return the ``weights``-weighted mean of ``values`` (NaN when total weight is 0)."""
    total = float(sum(weights))
    if total <= 0:
        return float("nan")
    return float(sum(v * w for v, w in zip(values, weights, strict=True)) / total)
