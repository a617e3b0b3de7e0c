"""Choose and configure Flower's aggregation strategy from the run config."""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from shared import protocol as p
from shared.config import RunConfig


def build_strategy(config: RunConfig) -> Strategy:
    """Return the aggregation strategy of ``config``, wrapped for central DP if asked.

    With ``central-dp`` set, Flower's own fixed-clipping wrappers add client-level
    DP: ``server-side`` clips every update on the server, ``client-side`` has each
    site clip its own (``client.app.clip_update_mod``); both add Gaussian noise to
    the aggregate.
    """
    base = build_base_strategy(config)
    if config.central_dp == "off":
        return base
    wrapper = (DifferentialPrivacyServerSideFixedClipping if config.central_dp == "server-side"
               else DifferentialPrivacyClientSideFixedClipping)
    return wrapper(base, noise_multiplier=config.central_dp_noise_multiplier,
                   clipping_norm=config.central_dp_clipping_norm,
                   num_sampled_clients=config.min_train_nodes)


def build_base_strategy(config: RunConfig) -> FedAvg:
    """Return FedAvg, FedProx or FedAdam configured from ``config``.

    Every strategy weights a site's update by its number of training cases and
    samples all connected sites (``fraction = 1``), never fewer than the
    configured minimums.
    """
    if config.strategy == "fedprox":
        return FedProx(
            min_train_nodes=config.min_train_nodes, min_evaluate_nodes=config.min_evaluate_nodes,
            min_available_nodes=config.min_available_nodes, weighted_by_key=p.NUM_EXAMPLES,
            arrayrecord_key=p.ARRAYS, configrecord_key=p.CONFIG,
            proximal_mu=config.proximal_mu,
        )
    if config.strategy == "fedadam":
        # Adam on the server (Reddi et al., 2021) with the paper's beta values.
        return FedAdam(
            min_train_nodes=config.min_train_nodes, min_evaluate_nodes=config.min_evaluate_nodes,
            min_available_nodes=config.min_available_nodes, weighted_by_key=p.NUM_EXAMPLES,
            arrayrecord_key=p.ARRAYS, configrecord_key=p.CONFIG,
            eta=config.server_learning_rate, eta_l=config.learning_rate,
            beta_1=0.9, beta_2=0.99, tau=1e-3,
        )
    return FedAvg(
        min_train_nodes=config.min_train_nodes, min_evaluate_nodes=config.min_evaluate_nodes,
        min_available_nodes=config.min_available_nodes, weighted_by_key=p.NUM_EXAMPLES,
        arrayrecord_key=p.ARRAYS, configrecord_key=p.CONFIG,
    )
