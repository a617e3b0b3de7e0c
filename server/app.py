"""The Flower ServerApp: parse the run config once, then run the federation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from server.config import RunConfig
from server.federation import Reporter, RunFolder, run_federation
from server.initial_model import load_initial_model
from server.planning import planned_run_config
from server.report import LineReporter
from server.resume import resume_point
from shared import settings
from shared.atomic import file_sha256
from shared.networks import build_network, seed_everything
from shared.partition import local_parameter_names, split_weights
from shared.weights import NDArrays, state_to_numpy

INFO = 20


def _flower_log(line: str) -> None:
    # Through Flower's logger, so `flwr log` shows the per-site lines.
    flwr_log(INFO, "%s", line)


def initial_weights(config: RunConfig) -> NDArrays:
    """Return the shared weights before round 1 for ``config``'s model (no site-local layers).

    The run config's ``initial-model`` when set (checked against the model), else
    weights seeded from ``seed``.
    """
    seed_everything(config.training.seed)
    net = build_network(config.model)
    local = local_parameter_names(net, config.model.adaptation)
    shared, _ = split_weights(state_to_numpy(net.state_dict()), local)
    if config.initial_model:
        return load_initial_model(Path(config.initial_model).expanduser(), config.model,
                                  shared, local)
    return shared


def make_server_app(config: RunConfig | None = None, run_dir: Path | None = None,
                    reporter: Reporter | None = None,
                    run_config: Mapping[str, Any] | None = None,
                    echo: Callable[[str], None] = _flower_log) -> ServerApp:
    """Build the ServerApp.

    Parameters
    ----------
    config : RunConfig, optional
        Settings to use as they are (no planning round).
    run_dir : Path, optional
        Where to write the run; ``<output-dir>/run-<run id>`` when omitted.
    reporter : Reporter, optional
        Progress sink; Flower's log when omitted.
    run_config : Mapping, optional
        Raw run-config values to plan and parse, instead of Flower's run config,
        when ``config`` is not given. With ``resume-from`` set, the run named there
        continues in its own folder with its saved settings.
    echo : callable
        Receives the plan's lines; Flower's log by default.

    Returns
    -------
    flwr.serverapp.ServerApp
        The app whose ``main`` runs all rounds.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        plan = None
        values = (settings.to_keys(config) if config is not None
                  else run_config if run_config is not None else context.run_config)
        # A resumed run keeps the settings it was planned with: no planning round.
        point = resume_point(values)
        if point is not None:
            cfg = point.config
            folder = RunFolder(point.run_dir)
            echo(f"resume: continuing {point.run_dir} after round {point.state.server_round} "
                 f"of {cfg.num_server_rounds}")
        else:
            if config is not None:
                cfg = config
            else:
                cfg, plan = planned_run_config(grid, values, echo)
            folder = RunFolder(run_dir if run_dir is not None
                               else cfg.output_dir / f"run-{context.run_id}")
        if plan is not None:
            folder.save_plan(plan, values)
        weights = point.state.weights if point else initial_weights(cfg)
        notes: dict[str, object] = {}
        if point is None and cfg.initial_model:
            # Recorded with the run: which file, bit for bit, every site started from.
            start = Path(cfg.initial_model).expanduser()
            notes["initial_model_sha256"] = file_sha256(start)
            echo(f"initial-model: round 1 starts from {start} (sha256 "
                 f"{str(notes['initial_model_sha256'])[:16]}...); sites train dp-trainable "
                 f"'{cfg.training.trainable}'")
        run_federation(grid, cfg, weights, folder, reporter or LineReporter(_flower_log),
                       resumed=point.state if point else None, notes=notes)
        flwr_log(INFO, "fedseg: final model written to %s", folder.final_model)

    return app


app = make_server_app()
