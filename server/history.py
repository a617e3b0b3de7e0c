"""The metrics history of a run: per round, per site; written as JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.atomic import write_text_atomic
from shared.metrics import weighted_mean
from shared.run_files import RunFiles


@dataclass
class SiteRound:
    """What one site reported in one round (``None``: not reported)."""

    site: str
    node_id: int
    num_train_cases: int | None = None
    train_loss: float | None = None
    train_steps: int | None = None
    num_val_cases: int | None = None
    val_dice: float | None = None
    #: Each foreground class's mean Dice, when the labels code several (else None).
    val_dice_per_class: list[float] | None = None
    epsilon: float | None = None
    delta: float | None = None
    #: Standard deviation of the DP-SGD noise in the site's mean gradient per step.
    noise_std: float | None = None
    #: The weight its update had in the aggregate, when site-weighting 'dp-noise' set it.
    weight: float | None = None
    refused: str | None = None
    error: str | None = None


@dataclass
class RoundRecord:
    """One round: every site's report and the case-weighted means."""

    round: int
    sites: list[SiteRound] = field(default_factory=list)
    mean_val_dice: float | None = None
    mean_train_loss: float | None = None
    aggregated: bool = False
    # Wall-clock seconds of each phase (training: its last attempt), each bounded by
    # round-timeout plus one pull of replies.
    train_seconds: float | None = None
    evaluate_seconds: float | None = None
    # Why the aggregated model was refused and the previous one kept (None: accepted).
    step_refused: str | None = None
    # Times the training phase was sent again because fewer than min-train-nodes sites
    # sent weights within round-timeout (round-retries bounds it).
    retries: int = 0

    def site(self, node_id: int, name: str) -> SiteRound:
        """Return the entry of ``node_id``, adding it on first use."""
        for entry in self.sites:
            if entry.node_id == node_id:
                if name:
                    entry.site = name
                return entry
        entry = SiteRound(site=name or f"node-{node_id}", node_id=node_id)
        self.sites.append(entry)
        self.sites.sort(key=lambda s: s.site)
        return entry

    def finalise(self) -> None:
        """Compute the case-weighted means over sites that reported."""
        evals = [s for s in self.sites if s.val_dice is not None and s.num_val_cases]
        if evals:
            self.mean_val_dice = weighted_mean(
                [s.val_dice for s in evals if s.val_dice is not None],
                [float(s.num_val_cases or 0) for s in evals],
            )
        trains = [s for s in self.sites if s.train_loss is not None and s.num_train_cases]
        if trains:
            self.mean_train_loss = weighted_mean(
                [s.train_loss for s in trains if s.train_loss is not None],
                [float(s.num_train_cases or 0) for s in trains],
            )


CSV_FIELDS = ["round", "site", "node_id", "num_train_cases", "train_loss", "train_steps",
              "num_val_cases", "val_dice", "epsilon", "delta", "refused", "error",
              # Added last: a reader of the earlier columns by position is unaffected.
              "val_dice_per_class", "noise_std", "weight"]


@dataclass
class MetricsHistory:
    """Everything the coordinator learns during a run, in one serialisable object."""

    run_config: dict[str, Any]
    rounds: list[RoundRecord] = field(default_factory=list)

    def site_names(self) -> dict[int, str]:
        """Return the name each node reported in earlier rounds, for naming a silent node."""
        return {s.node_id: s.site for r in self.rounds for s in r.sites
                if s.site != f"node-{s.node_id}"}

    def to_json(self) -> str:
        """Return the history as JSON (NaN written as ``null``)."""
        return json.dumps(_nan_to_none(asdict(self)), indent=2)

    def to_csv(self) -> str:
        """Return one CSV row per round and site."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for rnd in self.rounds:
            for s in rnd.sites:
                row = {k: v for k, v in asdict(s).items() if k != "site"}
                if s.val_dice_per_class is not None:
                    # One cell: the classes' Dice in class order, space-separated.
                    row["val_dice_per_class"] = " ".join(f"{v:.6g}" for v in
                                                         s.val_dice_per_class)
                writer.writerow({"round": rnd.round, "site": s.site, **row})
        return buf.getvalue()

    def write(self, files: RunFiles) -> tuple[Path, Path]:
        """Write ``metrics.json`` and ``metrics.csv`` atomically; return their paths."""
        write_text_atomic(files.metrics_json, self.to_json())
        write_text_atomic(files.metrics_csv, self.to_csv())
        return files.metrics_json, files.metrics_csv

    @classmethod
    def read(cls, path: Path) -> MetricsHistory:
        """Load a history written by :meth:`write`."""
        return cls.from_json(path.read_text())

    @classmethod
    def from_json(cls, text: str) -> MetricsHistory:
        """Parse the JSON of :meth:`to_json`."""
        raw = json.loads(text)
        rounds = []
        for r in raw["rounds"]:
            sites = [SiteRound(**s) for s in r.pop("sites")]
            rounds.append(RoundRecord(sites=sites, **r))
        return cls(run_config=raw["run_config"], rounds=rounds)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
