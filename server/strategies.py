"""Choose and configure Flower's aggregation strategy from the run config."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from shared import protocol as p
from shared.config import RunConfig


def build_strategy(config: RunConfig) -> FedAvg:
    """Return FedAvg, FedProx or FedAdam configured from ``config``.

    Every strategy weights a site's update by its number of training cases and
    samples all connected sites (``fraction = 1``), never fewer than the
    configured minimums.
    """
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": config.min_train_nodes,
        "min_evaluate_nodes": config.min_evaluate_nodes,
        "min_available_nodes": config.min_available_nodes,
        "weighted_by_key": p.NUM_EXAMPLES,
        "arrayrecord_key": p.ARRAYS,
        "configrecord_key": p.CONFIG,
    }
    if config.strategy == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)  # type: ignore[arg-type]
    if config.strategy == "fedadam":
        # Adam on the server (Reddi et al., 2021); beta values are the paper's defaults.
        return FedAdam(eta=config.server_learning_rate, eta_l=config.learning_rate,  # type: ignore[arg-type]
                       beta_1=0.9, beta_2=0.99, tau=1e-3, **common)
    return FedAvg(**common)  # type: ignore[arg-type]
