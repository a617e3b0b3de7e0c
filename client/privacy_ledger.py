"""The site's privacy ledger: every DP-SGD step it ever took, kept on its own disk.

Saved atomically after every round and read at start, so a daemon restart or a
new run continues the same cumulative epsilon instead of starting from zero. A
damaged ledger stops training with a clear error; it is never silently reset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.accounting import compute_epsilon
from shared.atomic import write_text_atomic
from shared.errors import DataError
from shared.privacy import Mechanism, Step

FORMAT = "fedseg-privacy-ledger/1"
FILE_NAME = "privacy-ledger.json"


@dataclass
class PrivacyLedger:
    """Cumulative DP-SGD history of one site."""

    path: Path
    history: list[Step] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    calibrated_noise: float | None = None

    @classmethod
    def load(cls, state_dir: Path) -> PrivacyLedger:
        """Read the ledger in ``state_dir`` (an empty one if the site never trained with DP)."""
        path = state_dir / FILE_NAME
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ValueError("unknown format")
            history = [(float(n), float(q), int(k)) for n, q, k in raw["history"]]
            noise = raw.get("calibrated_noise")
            return cls(path, history, list(raw.get("rounds", [])),
                       None if noise is None else float(noise))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(path, f"privacy ledger is damaged ({exc})",
                            "restore it from backup; deleting it would forget the privacy "
                            "already spent") from None

    def epsilon(self, delta: float, mechanism: Mechanism, extra: Step | None = None) -> float:
        """Return the epsilon spent so far, plus ``extra`` if given (a projection)."""
        steps = self.history + ([extra] if extra else [])
        return compute_epsilon(steps, delta, mechanism)

    def record(self, step: Step, server_round: int, epsilon: float) -> None:
        """Append one round's steps and write the ledger atomically."""
        self.history.append(step)
        self.rounds.append({"round": server_round, "noise_multiplier": step[0],
                            "sample_rate": step[1], "steps": step[2], "epsilon": epsilon})
        self.save()

    def save(self) -> None:
        """Write the ledger atomically."""
        write_text_atomic(self.path, json.dumps({
            "format": FORMAT,
            "history": [list(s) for s in self.history],
            "rounds": self.rounds,
            "calibrated_noise": self.calibrated_noise,
        }, indent=2))
