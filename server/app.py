"""The Flower ServerApp: parse the run config once, then run the federation."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from server.config import RunConfig
from server.federation import Reporter, RunFolder, run_federation
from server.report import LineReporter
from shared.networks import build_network, seed_everything
from shared.partition import local_parameter_names, split_weights
from shared.weights import NDArrays, state_to_numpy

INFO = 20


def _flower_log(line: str) -> None:
    # Through Flower's logger, so `flwr log` shows the per-site lines.
    flwr_log(INFO, "%s", line)


def initial_weights(config: RunConfig) -> NDArrays:
    """Return the seeded initial shared weights for ``config``'s model (no site-local layers)."""
    seed_everything(config.training.seed)
    net = build_network(config.model)
    shared, _ = split_weights(state_to_numpy(net.state_dict()),
                              local_parameter_names(net, config.model.adaptation))
    return shared


def make_server_app(config: RunConfig | None = None, run_dir: Path | None = None,
                    reporter: Reporter | None = None) -> ServerApp:
    """Build the ServerApp.

    Parameters
    ----------
    config : RunConfig, optional
        Settings to use; parsed from Flower's run config when omitted.
    run_dir : Path, optional
        Where to write the run; ``<output-dir>/run-<run id>`` when omitted.
    reporter : Reporter, optional
        Progress sink; Flower's log when omitted.

    Returns
    -------
    flwr.serverapp.ServerApp
        The app whose ``main`` runs all rounds.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else RunConfig.from_user_config(context.run_config)
        folder = RunFolder(run_dir if run_dir is not None
                           else cfg.output_dir / f"run-{context.run_id}")
        run_federation(grid, cfg, initial_weights(cfg), folder,
                       reporter or LineReporter(_flower_log))
        flwr_log(INFO, "fedseg: final model written to %s", folder.final_model)

    return app


app = make_server_app()
