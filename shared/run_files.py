"""The names of what a run writes, in one place.

The ServerApp writes a run folder; the simulation, the command line, the
benchmarks and the tests read it. All of them name its files through
:class:`RunFiles`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FINAL_MODEL = "final_model.pt"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
CHECKPOINTS = "checkpoints"
PLAN_JSON = "plan.json"
REPORT_HTML = "report.html"
CROSS_SITE_JSON = "cross-site.json"
OVERLAYS = "overlays"
RESUME_STATE = "resume-state.pt"
SIMULATION_JSON = "simulation.json"


@dataclass(frozen=True)
class RunFiles:
    """Paths inside one run folder."""

    path: Path

    @property
    def final_model(self) -> Path:
        """The final global model (global weights plus the model spec)."""
        return self.path / FINAL_MODEL

    @property
    def metrics_json(self) -> Path:
        """The metrics history as JSON."""
        return self.path / METRICS_JSON

    @property
    def metrics_csv(self) -> Path:
        """The metrics history as CSV, one row per round and site."""
        return self.path / METRICS_CSV

    @property
    def plan_json(self) -> Path:
        """The plan made from the sites' fingerprints (absent when nothing was planned)."""
        return self.path / PLAN_JSON

    @property
    def report_html(self) -> Path:
        """The run report: one self-contained HTML file (``fedseg report``)."""
        return self.path / REPORT_HTML

    @property
    def cross_site_json(self) -> Path:
        """Cross-site evaluation: every model's Dice on every site's validation cases.

        Absent unless something evaluated the models across sites. The format is
        ``{"sites": [S names], "models": [M names], "dice": [[...] * M] * S}``:
        ``dice[i][j]`` is the case-weighted mean foreground Dice of model ``j`` on
        site ``i``'s validation cases, a number in [0, 1] or ``null`` where that pair
        was not evaluated. Other keys are ignored.
        """
        return self.path / CROSS_SITE_JSON

    @property
    def overlays(self) -> Path:
        """A folder of PNG overlays of predicted masks on validation images.

        Absent unless a site chose to publish some (a site's images never leave it
        in a federated run): each ``*.png`` shows the predicted mask as contours on
        the image and the uncertainty as a heat map; the report shows the file name
        as the caption.
        """
        return self.path / OVERLAYS

    @property
    def resume_state(self) -> Path:
        """What a resumed run needs to continue after the last finished round."""
        return self.path / RESUME_STATE

    @property
    def simulation_json(self) -> Path:
        """The request of ``fedseg simulate`` (data, sites), so ``--resume`` alone suffices."""
        return self.path / SIMULATION_JSON

    @property
    def checkpoints(self) -> Path:
        """The folder of per-round checkpoints."""
        return self.path / CHECKPOINTS

    def checkpoint(self, server_round: int) -> Path:
        """Return the checkpoint written after ``server_round``."""
        return self.checkpoints / f"round-{server_round:03d}.pt"
