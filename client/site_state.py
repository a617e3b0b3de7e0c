"""A site's own layers (domain adaptation), kept on its disk and never sent anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shared.atomic import write_atomic
from shared.errors import DataError
from shared.weights import NDArrays, numpy_to_state, state_to_numpy

FORMAT = "fedseg-local-layers/1"
FILE_NAME = "local-layers.pt"


def load_local_layers(state_dir: Path, adaptation: str,
                      expected: dict[str, tuple[int, ...]]) -> NDArrays | None:
    """Return the saved site-local weights, or ``None`` if this site has none yet.

    Raises
    ------
    DataError
        The file is unreadable, or was written for another adaptation mode or model.
    """
    path = state_dir / FILE_NAME
    if not path.exists():
        return None
    fix = "move it aside to start the site's local layers afresh"
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise DataError(path, f"cannot be read ({type(exc).__name__})", fix) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(path, "is not a fedseg local-layers file", fix)
    if payload.get("adaptation") != adaptation:
        raise DataError(path, f"holds layers for adaptation '{payload.get('adaptation')}', "
                        f"this run uses '{adaptation}'", fix)
    weights = state_to_numpy(payload["weights"])
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    if shapes != expected:
        raise DataError(path, "does not match this run's model", fix)
    return weights


def save_local_layers(state_dir: Path, adaptation: str, weights: NDArrays) -> None:
    """Write the site-local weights atomically."""
    payload = {"format": FORMAT, "adaptation": adaptation, "weights": numpy_to_state(weights)}
    write_atomic(state_dir / FILE_NAME, lambda tmp: torch.save(payload, tmp))
