"""Flower's aggregation strategies and central-DP wrappers, one registry entry each.

Every strategy gets the same constructor arguments (written once in
:func:`build_base_strategy`) plus its own options from its entry. The robust rules
(median, trimmed mean, Krum) are Flower's own; every update is validated before
any of them sees it (:mod:`server.validation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from shared import protocol as p
from shared.config import TrainPlan
from shared.registry import Registry


class StrategySettings(Protocol):
    """What the strategies read of :class:`server.config.RunConfig`."""

    @property
    def strategy(self) -> str: ...  # noqa: D102
    @property
    def proximal_mu(self) -> float: ...  # noqa: D102
    @property
    def server_learning_rate(self) -> float: ...  # noqa: D102
    @property
    def min_train_nodes(self) -> int: ...  # noqa: D102
    @property
    def training(self) -> TrainPlan: ...  # noqa: D102
    @property
    def trim_fraction(self) -> float: ...  # noqa: D102
    @property
    def num_malicious_nodes(self) -> int: ...  # noqa: D102
    @property
    def central_dp(self) -> str: ...  # noqa: D102
    @property
    def central_dp_noise_multiplier(self) -> float: ...  # noqa: D102
    @property
    def central_dp_clipping_norm(self) -> float: ...  # noqa: D102


def _no_options(config: StrategySettings) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class StrategyType:
    """One aggregation strategy.

    Attributes
    ----------
    cls : type
        A Flower strategy taking FedAvg's constructor arguments.
    doc : str
        One line for users.
    options : callable
        Its own constructor arguments, from the run config.
    proximal : bool
        Sites add FedProx's proximal term (with the run's ``proximal-mu``).
    """

    cls: Callable[..., FedAvg]
    doc: str
    options: Callable[[StrategySettings], dict[str, Any]] = field(default=_no_options)
    proximal: bool = False


STRATEGIES: Registry[StrategyType] = Registry("strategy", {
    "fedavg": StrategyType(FedAvg, "weighted average (site-weighting)"),
    "fedprox": StrategyType(FedProx, "FedAvg plus a proximal term at the sites",
                            lambda c: {"proximal_mu": c.proximal_mu}, proximal=True),
    # Adam on the server (Reddi et al., 2021) with the paper's beta values.
    "fedadam": StrategyType(FedAdam, "Adam on the server", lambda c: {
        "eta": c.server_learning_rate, "eta_l": c.training.learning_rate,
        "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    "fedmedian": StrategyType(FedMedian, "coordinate-wise median (robust to a minority of "
                              "bad sites)"),
    "fedtrimmedavg": StrategyType(FedTrimmedAvg, "mean after dropping the trim-fraction largest "
                                  "and smallest values of every coordinate",
                                  lambda c: {"beta": c.trim_fraction}),
    "krum": StrategyType(Krum, "the update closest to its neighbours (Blanchard et al., 2017); "
                         "needs more than 2 * num-malicious-nodes + 2 sites",
                         lambda c: {"num_malicious_nodes": c.num_malicious_nodes}),
})


@dataclass(frozen=True)
class SiteWeighting:
    """How FedAvg-style strategies weight each site's update.

    Attributes
    ----------
    uniform : bool
        Every site sends the weight 1 instead of its number of cases.
    doc : str
        What the weight is, for the README.
    by_noise : bool
        The server replaces the sites' weights by :func:`shared.privacy.noise_weights`
        of the DP-SGD noise each reports.
    """

    uniform: bool
    doc: str
    by_noise: bool = False


SITE_WEIGHTINGS: Registry[SiteWeighting] = Registry("site weighting", {
    "cases": SiteWeighting(False, "by its number of training cases (FedAvg's weights)"),
    # A small hospital's cases then pull the global model as hard as a large one's:
    # on chest X-ray, 118 Montgomery cases beside 448 from Shenzhen.
    "equal": SiteWeighting(True, "every site alike, whatever its number of cases"),
    # Under DP-SGD a site's noise depends on its patients per batch and its own
    # epsilon, not on its cases: CHASE_DB1's 18 images are 9 children.
    "dp-noise": SiteWeighting(False, "by the inverse variance of the DP-SGD noise in its "
                              "update (sites without DP-SGD as the least noisy one; all "
                              "alike when none trains under DP-SGD)", by_noise=True),
})


@dataclass(frozen=True)
class CentralDPType:
    """One client-level DP mode: a Flower fixed-clipping wrapper, or none."""

    wrapper: Callable[..., Strategy] | None
    doc: str


class ServerSideFixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping wrapper, taking an update of norm 0 too.

    Flower's clipping divides the clipping norm by the update's norm, so a site
    that sends the global model back unchanged (every step skipped) would stop
    the run with ``ZeroDivisionError``. A zero update is its own clip; every
    other step is Flower's (``aggregate_train`` of flwr 1.41, with that one
    guard).
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each update, aggregate with the wrapped strategy, add the noise."""
        replies_list = list(replies)
        event = self._pop_pending_event(server_round)
        if not validate_replies(replies_list, self.num_sampled_clients,
                                strict=self.accountant is not None):
            return None, None
        self._validate_uniform_weights(replies_list)
        current = self.current_arrays.to_numpy_ndarrays()
        for reply in replies_list:
            for name, record in reply.content.array_records.items():
                update = [np.subtract(x, y) for x, y in
                          zip(record.to_numpy_ndarrays(), current, strict=True)]
                if get_norm(update) > 0:
                    clip_inputs_inplace(update, self.clipping_norm)
                reply.content[name] = ArrayRecord({
                    k: Array(np.asarray(y + u))
                    for k, y, u in zip(record.keys(), current, update, strict=True)})
        arrays, metrics = self.strategy.aggregate_train(server_round, replies_list)
        if arrays:
            arrays = self._add_noise_to_aggregated_arrays(arrays)
            self._compose_release(event)
        return arrays, metrics


CENTRAL_DP: Registry[CentralDPType] = Registry("central-dp mode", {
    "off": CentralDPType(None, "no client-level DP"),
    "server-side": CentralDPType(ServerSideFixedClipping,
                                 "the server clips every update"),
    # The ClientApp's clip_update_mod clips at the site when the config asks for it.
    "client-side": CentralDPType(DifferentialPrivacyClientSideFixedClipping,
                                 "each site clips its own update"),
})


def build_strategy(config: StrategySettings) -> Strategy:
    """Return the aggregation strategy of ``config``, wrapped for central DP if asked.

    With ``central-dp`` set, Flower's own fixed-clipping wrappers add client-level
    DP; both add Gaussian noise to the aggregate.
    """
    base = build_base_strategy(config)
    wrapper = CENTRAL_DP[config.central_dp].wrapper
    if wrapper is None:
        return base
    return wrapper(base, noise_multiplier=config.central_dp_noise_multiplier,
                   clipping_norm=config.central_dp_clipping_norm,
                   num_sampled_clients=config.min_train_nodes)


def build_base_strategy(config: StrategySettings) -> FedAvg:
    """Return the registered strategy of ``config``.

    Every strategy weights a site's update by the ``num-examples`` of its reply: its
    training cases, or 1 when the round asks for uniform weights (``site-weighting``
    ``equal``, central DP). The coordinator chooses the sites itself, with a
    deadline, and enforces the run's minimums (:mod:`server.deadline`); the
    strategy is shown only the chosen sites and asks them all (fraction 1,
    minimums 1), because Flower's own sampling would wait without a deadline for
    sites that have gone.
    """
    entry = STRATEGIES[config.strategy]
    return entry.cls(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
        min_available_nodes=1, weighted_by_key=p.NUM_EXAMPLES,
        arrayrecord_key=p.ARRAYS, configrecord_key=p.CONFIG, **entry.options(config),
    )


def base_strategy(strategy: Strategy) -> FedAvg:
    """Return the aggregating strategy inside ``strategy`` (a central-DP wrapper holds one)."""
    inner = getattr(strategy, "strategy", None)
    if isinstance(inner, Strategy):
        return base_strategy(inner)
    if not isinstance(strategy, FedAvg):
        raise TypeError(f"{type(strategy).__name__} is not one of fedseg's strategies; build it "
                        "with server.strategies.build_strategy")
    return strategy
