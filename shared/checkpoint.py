"""Model checkpoints: the global weights plus what is needed to rebuild the network."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.atomic import write_atomic
from shared.config import ModelSpec
from shared.errors import DataError
from shared.settings import ROUND_CONFIG, Source
from shared.weights import NDArrays, numpy_to_state, state_to_numpy

FORMAT = "fedseg-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    """A saved global model."""

    spec: ModelSpec
    weights: NDArrays
    server_round: int

    def save(self, path: Path) -> None:
        """Write the checkpoint atomically (loadable with ``torch.load(weights_only=True)``)."""
        payload: dict[str, Any] = {
            "format": FORMAT,
            "round": self.server_round,
            "model": self.spec.to_config(),
            "weights": numpy_to_state(self.weights),
        }
        write_atomic(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """Read a checkpoint written by :meth:`save`, with a clear error otherwise."""
        if not path.is_file():
            raise DataError(path, "model file not found", "pass the final_model.pt of a run")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise DataError(path, f"cannot be read as a fedseg model ({type(exc).__name__})",
                            "pass the final_model.pt of a run") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise DataError(path, "is not a fedseg checkpoint", "pass the final_model.pt of a run")
        return cls(
            spec=ModelSpec.from_config(payload["model"],
                                      Source(f"checkpoint {path}", ROUND_CONFIG.fix)),
            weights=state_to_numpy(payload["weights"]),
            server_round=int(payload["round"]),
        )
