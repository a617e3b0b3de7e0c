"""A site's own layers (domain adaptation), kept on its disk and never sent anywhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from shared.atomic import write_atomic
from shared.errors import DataError
from shared.weights import NDArrays, numpy_to_state, state_to_numpy

FORMAT = "fedseg-local-layers/1"
FILE_NAME = "local-layers.pt"
# Unlike the privacy ledger, losing these layers costs only accuracy, never privacy.
_FIX = "move it aside to start the site's local layers afresh"


def load_local_layers(state_dir: Path, adaptation: str,
                      expected: dict[str, tuple[int, ...]]) -> NDArrays | None:
    """Return the saved site-local weights, or ``None`` if this site has none yet.

    Raises
    ------
    DataError
        The file is damaged (see :func:`read_local_layers`), or was written for
        another adaptation mode or model.
    """
    saved = read_local_layers(state_dir)
    if saved is None:
        return None
    path = state_dir / FILE_NAME
    saved_adaptation, weights = saved
    if saved_adaptation != adaptation:
        raise DataError(path, f"holds layers for adaptation '{saved_adaptation}', "
                        f"this run uses '{adaptation}'", _FIX)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    if shapes != expected:
        raise DataError(path, "does not match this run's model", _FIX)
    return weights


def read_state_file(path: Path, file_format: str, what: str, kind: str,
                    fix: str) -> dict[str, Any] | None:
    """Return the dictionary a fedseg state file at ``path`` holds, ``None`` if there is none.

    One check for every site-state file (local layers, personal model): a file that
    exists but is not a readable ``file_format`` dictionary stops the site.

    Raises
    ------
    DataError
        "damaged <what>": not a file, unreadable, or not a fedseg <kind> file.
    """
    if not os.path.lexists(path):
        return None
    if not path.is_file():
        raise DataError(path, f"damaged {what}: not a file", fix)
    try:
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise DataError(path, f"damaged {what}: cannot be read ({type(exc).__name__})",
                        fix) from None
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise DataError(path, f"damaged {what}: not a fedseg {kind} file", fix)
    return payload


def read_local_layers(state_dir: Path) -> tuple[str, NDArrays] | None:
    """Return the adaptation mode and weights saved in ``state_dir``, or ``None`` if none.

    Checks only that the file is one :func:`save_local_layers` wrote; whether its
    shapes fit the model is up to :func:`load_local_layers`.

    Raises
    ------
    DataError
        "damaged local layers": not a readable file, or not a fedseg local-layers file.
    """
    path = state_dir / FILE_NAME
    payload = read_state_file(path, FORMAT, "local layers", "local-layers", _FIX)
    if payload is None:
        return None
    adaptation, weights = payload.get("adaptation"), payload.get("weights")
    if not isinstance(adaptation, str) or not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise DataError(path, "damaged local layers: no adaptation mode or weights", _FIX)
    return adaptation, state_to_numpy(weights)


def save_local_layers(state_dir: Path, adaptation: str, weights: NDArrays) -> None:
    """Write the site-local weights atomically."""
    payload = {"format": FORMAT, "adaptation": adaptation, "weights": numpy_to_state(weights)}
    write_atomic(state_dir / FILE_NAME, lambda tmp: torch.save(payload, tmp))
