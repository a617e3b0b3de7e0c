"""Local multi-site simulation through Flower's simulation engine.

The same ServerApp and ClientApp a deployment uses are composed here; only two
things differ: each virtual SuperNode is mapped to one site folder, and the run
config is built from presets and ``--run-config`` instead of ``flwr run``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from client.config import SiteConfig
from client.trainer import SiteData
from server.config import RunConfig
from server.report import LineReporter
from server.resume import ResumeError, resume_at
from shared import settings
from shared.atomic import write_text_atomic
from shared.config import ModelSpec
from shared.errors import DataError
from shared.run_files import RunFiles
from shared.settings import AUTO
from simulations.cross_site import write_cross_site
from simulations.sites import check_site_settings, find_site_folders, probe_layout

# Settings that make the built-in synthetic task converge in a few minutes on 2 CPUs;
# every planned key is set, so the synthetic run needs no planning round. Real data
# (--data) is planned from the sites' fingerprints instead.
_SYNTHETIC: dict[str, Any] = {"in-channels": 1, "num-classes": 2, "resize": "none",
                              "downsample": "none",
                              "normalization": "zscore",
                              "lr-schedule": "constant", "learning-rate": 0.003,
                              "personalization": "none", "finetune-steps": 0,
                              "site-weighting": "cases"}
SYNTHETIC_2D: dict[str, Any] = {
    **_SYNTHETIC, "num-server-rounds": 6, "local-steps": 15, "batch-size": 8,
    "patch-size": "64,64", "channels": "16,32,64,128",
}
SYNTHETIC_3D: dict[str, Any] = {
    **_SYNTHETIC, "num-server-rounds": 4, "local-steps": 10, "batch-size": 2,
    "patch-size": "32,32,32", "channels": "8,16,32,64",
}


@dataclass(frozen=True)
class SimulationRequest:
    """What ``fedseg simulate`` was asked to do."""

    data: Path | None = None
    num_sites: int = 3
    output: Path = Path("runs")
    overrides: Mapping[str, Any] = field(default_factory=dict)
    synthetic_dims: int = 2
    cases_per_site: int = 24
    synthetic_size: int = 0
    seed: int = 0
    #: The run folder of an earlier simulation to continue (its recorded sites and
    #: saved settings; ``overrides`` may only raise num-server-rounds).
    resume: Path | None = None
    #: Node-config keys every simulated site takes (``--site-config``), checked by
    #: :func:`simulations.sites.read_site_settings`.
    site_settings: Mapping[str, Any] = field(default_factory=dict)


SIMULATION_FORMAT = "fedseg-simulation/1"


def record_simulation(run_dir: Path, request: SimulationRequest, folders: list[Path]) -> None:
    """Write what ``--resume`` needs to find the same sites again into ``run_dir``.

    Site folders inside the run folder (synthetic data) are written relative to it,
    so a moved run folder still resumes.
    """
    def where(folder: Path) -> str:
        folder = folder.resolve()
        inside = folder.is_relative_to(run_dir.resolve())
        return str(folder.relative_to(run_dir.resolve()) if inside else folder)

    record = {"format": SIMULATION_FORMAT, "sites": [where(f) for f in folders],
              "data": None if request.data is None else str(request.data.resolve()),
              "synthetic-dims": request.synthetic_dims,
              "cases-per-site": request.cases_per_site,
              "synthetic-size": request.synthetic_size, "seed": request.seed,
              "overrides": dict(request.overrides),
              "site-config": dict(request.site_settings)}
    write_text_atomic(RunFiles(run_dir).simulation_json, json.dumps(record, indent=2) + "\n")


def recorded_site_settings(run_dir: Path) -> dict[str, Any]:
    """Return the ``--site-config`` keys the simulation in ``run_dir`` gave its sites."""
    values = json.loads(RunFiles(run_dir).simulation_json.read_text()).get("site-config", {})
    if not isinstance(values, dict):
        raise ResumeError(run_dir, "simulation.json is damaged (site-config)",
                          "restore it from a backup", where="--resume")
    check_site_settings(values, settings.Source(f"--resume {run_dir}: simulation.json",
                                                "restore it from a backup"))
    return values


def recorded_sites(run_dir: Path) -> list[Path]:
    """Return the site folders the simulation in ``run_dir`` ran on, refusing what cannot resume."""
    path = RunFiles(run_dir).simulation_json
    if not run_dir.is_dir():
        raise ResumeError(run_dir, "run folder not found", "pass the folder of the simulation "
                          "to continue, e.g. runs/sim-<time>", where="--resume")
    if not path.is_file():
        raise ResumeError(run_dir, f"has no {path.name}, so it is not a run folder of fedseg "
                          "simulate", "pass a folder runs/sim-<time>/ it wrote, or continue a "
                          "deployed run with the run config's resume-from", where="--resume")
    try:
        sites = [run_dir / site for site in json.loads(path.read_text())["sites"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ResumeError(run_dir, f"{path.name} is damaged ({type(exc).__name__})",
                          "restore it from a backup", where="--resume") from None
    for site in sites:
        if not site.is_dir():
            raise DataError(site, "site folder of the simulation to resume not found",
                            "put the data back where the simulation read it")
    return sites


@dataclass(frozen=True)
class SimulationOutcome:
    """Where a finished simulation wrote its results."""

    run_dir: Path
    metrics_json: Path
    metrics_csv: Path
    final_model: Path
    wall_seconds: float


def preflight_spec(site: Path, cache: Path | None = None) -> ModelSpec:
    """Return a model spec that reads ``site``'s cases as they are (for the preflight only)."""
    spatial, channels = probe_layout(site, cache)
    return ModelSpec(in_channels=channels, patch_size=(32,) * spatial)


def build_run_values(presets: Mapping[str, Any], overrides: Mapping[str, Any],
                     num_sites: int, run_dir: Path) -> dict[str, Any]:
    """Merge presets and user overrides into run-config values, validated once here.

    Planned keys that neither sets stay ``auto``: the ServerApp plans them from
    the sites' fingerprints, as in a deployment.
    """
    values: dict[str, Any] = {
        "min-available-nodes": num_sites, "min-train-nodes": num_sites,
        "min-evaluate-nodes": num_sites, "output-dir": str(run_dir.parent),
        **{key: AUTO for key in settings.planned_keys(RunConfig)},
    }
    values.update(presets)
    values.update(overrides)
    RunConfig.from_user_config(values)  # a bad override stops here, before Ray starts
    return values


def preflight(sites: list[SiteConfig], spec: ModelSpec) -> list[str]:
    """Read every case of every site through the data contract before Flower starts.

    A bad file then stops the run with one clear line before any output exists,
    instead of surfacing later as a failed site inside the federation. The cases go
    into each site's disk cache (its state dir is in the run folder), so the site
    processes, which are other processes, decode nothing again.
    """
    lines = []
    for site in sites:
        data = SiteData.load(site, spec)
        lines.append(f"  {site.site_name:<14} {len(data.train):>3} train / {len(data.val):>3} val "
                     f"cases  ({site.data_path})")
    return lines


def run_simulation(request: SimulationRequest,
                   echo: Callable[[str], None] = print) -> SimulationOutcome:
    """Run a federated simulation and return where it wrote its results.

    Parameters
    ----------
    request : SimulationRequest
        Data folder (synthetic when ``None``), number of synthetic sites, output
        folder and run-config overrides.
    echo : callable
        Receives progress lines.

    Returns
    -------
    SimulationOutcome
        Paths of the metrics history, the final model and the wall time.
    """
    started = time.monotonic()
    if request.resume is not None:
        return _resume_simulation(request.resume, request.overrides, echo, started)
    run_dir = request.output / datetime.now().strftime("sim-%Y%m%d-%H%M%S-%f")
    if request.data is None:
        from simulations.phantoms import write_synthetic_federation

        side = request.synthetic_size or (96 if request.synthetic_dims == 2 else 48)
        shape = (side,) * request.synthetic_dims
        data_dir = run_dir / "synthetic-data"
        echo(f"writing {request.num_sites} synthetic {request.synthetic_dims}D sites to {data_dir}")
        folders = write_synthetic_federation(data_dir, request.num_sites, request.cases_per_site,
                                             shape=shape, seed=request.seed)
        presets = dict(SYNTHETIC_2D if request.synthetic_dims == 2 else SYNTHETIC_3D)
    else:
        folders = find_site_folders(request.data)
        presets = {}
    values = build_run_values(presets, request.overrides, len(folders), run_dir)
    config = RunConfig.from_user_config(values)
    if config.initial_model:
        check_initial_model(config, planned=RunConfig.needs_plan(values))
    record_simulation(run_dir, request, folders)
    sites = simulated_sites(folders, run_dir, request.site_settings)
    if (RunConfig.needs_plan(values) and not config.initial_model
            and any(site.privacy.enabled for site in sites)):
        values = _public_start(sites, values, run_dir, echo)
    if RunConfig.needs_plan(values):
        echo(f"{len(sites)} sites, strategy {config.strategy}; rounds, resolution, patch, "
             "network and schedule are planned from the sites' data fingerprints")
        spec = preflight_spec(folders[0], sites[0].cache_dir)
    else:
        echo(f"{len(sites)} sites, {config.num_server_rounds} rounds, strategy "
             f"{config.strategy}, {config.model.network} {config.model.spatial_dims}D, patch "
             f"{'x'.join(map(str, config.model.patch_size))}")
        spec = config.model
    for line in preflight(sites, spec):
        echo(line)
    return _finish(values, sites, run_dir, echo, started)


def _public_start(sites: list[SiteConfig], values: dict[str, Any], run_dir: Path,
                  echo: Callable[[str], None]) -> dict[str, Any]:
    """Start a planned DP-SGD run from a public phantom model when one fits the sites.

    The fingerprints are the ones the planning round will collect (the sites' disk
    caches keep the decoded cases for it), so the model has the planned architecture.
    """
    from client.fingerprint import fingerprint_site
    from simulations.pretrain import public_start

    return public_start([fingerprint_site(site) for site in sites], values, run_dir, echo)


def check_initial_model(config: RunConfig, planned: bool) -> None:
    """Refuse a bad ``initial-model`` before Ray starts.

    Its fit to the model is checked here when the run config fixes the model; a
    planned model is known only after the planning round, where the ServerApp
    checks it.
    """
    from server.app import initial_weights
    from server.initial_model import read_file

    if planned:
        read_file(Path(config.initial_model).expanduser())
    else:
        initial_weights(config)


def simulated_sites(folders: list[Path], run_dir: Path,
                    site_settings: Mapping[str, Any] | None = None) -> list[SiteConfig]:
    """Return one site per folder, its state kept in the run folder, seeded by its position.

    ``site_settings`` (node-config keys, already checked) apply to every site.
    """
    common = {"num-threads": 1, "device": "auto", **(site_settings or {})}
    return [
        settings.parse(SiteConfig, {
            **common, "data-path": str(folder), "site-name": folder.name,
            "state-dir": str(run_dir / "site-state" / folder.name), "seed": i,
        }, settings.NODE_CONFIG)
        for i, folder in enumerate(folders)
    ]


def _resume_simulation(run_dir: Path, overrides: Mapping[str, Any],
                       echo: Callable[[str], None], started: float) -> SimulationOutcome:
    """Continue the simulation in ``run_dir`` on the sites it recorded."""
    sites = simulated_sites(recorded_sites(run_dir), run_dir, recorded_site_settings(run_dir))
    values = {**overrides, "resume-from": str(run_dir)}
    point = resume_at(run_dir, values)  # a refusal stops here, before Ray starts
    echo(f"resuming {run_dir} after round {point.state.server_round} of "
         f"{point.config.num_server_rounds} with its {len(sites)} sites")
    for line in preflight(sites, point.config.model):
        echo(line)
    return _finish(values, sites, run_dir, echo, started)


def _finish(values: Mapping[str, Any], sites: list[SiteConfig], run_dir: Path,
            echo: Callable[[str], None], started: float) -> SimulationOutcome:
    _run_flower(values, sites, run_dir, echo)
    files = RunFiles(run_dir)
    if not files.final_model.is_file():
        raise RuntimeError(f"the simulation ended without writing {files.final_model}; "
                           "see the log above")
    echo("cross-site evaluation: each site's deployed model on every site's validation cases")
    write_cross_site(run_dir, sites)
    wall = time.monotonic() - started
    return SimulationOutcome(run_dir, files.metrics_json, files.metrics_csv,
                             files.final_model, wall)


def _run_flower(values: Mapping[str, Any], sites: list[SiteConfig], run_dir: Path,
                echo: Callable[[str], None]) -> None:
    # Ray and Flower print a lot at INFO; the per-round lines come from our reporter.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Keep GPUs visible to the site processes although each asks Ray for 0 GPUs.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Imported here: Ray and the apps load only after the data passed its preflight.
    from flwr.app import Context
    from flwr.simulation import run_simulation as flower_run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    logging.getLogger("flwr").setLevel(logging.WARNING)

    def resolve_site(context: Context) -> SiteConfig:
        return sites[int(context.node_config["partition-id"])]

    server_app = make_server_app(run_dir=run_dir, reporter=LineReporter(echo), run_config=values,
                                 echo=echo)
    client_app = make_client_app(resolve_site)
    # One site process per site even beyond the cores (each uses one thread): with
    # three sites on two cores, two processes at a time left a core idle while the
    # third trained (retina rounds 21 s; all three at once 18 s, same weights).
    cpus = max(1, os.cpu_count() or 1, len(sites))
    flower_run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(sites),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False},
        },
    )
