"""The coordinator's run config, declared once per key and validated once.

Read from ``[tool.flwr.app.config]`` in ``pyproject.toml`` (overridable with
``flwr run --run-config``) and parsed on the server only. Its keys are this
class's settings plus those of its sections: the model (:class:`ModelSpec`),
the local training (:class:`TrainPlan`) and the DP-SGD request
(:class:`PrivacyRequest`); those travel to the sites in the round config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from server.strategies import CENTRAL_DP, SITE_WEIGHTINGS, STRATEGIES
from shared import settings
from shared.config import ModelSpec, TrainPlan
from shared.privacy import PrivacyRequest
from shared.settings import (
    RUN_CONFIG,
    Source,
    check,
    choice,
    integer,
    invalid,
    number,
    path,
    section,
    text,
)
from shared.trainable import shared_trainable_names
from shared.weights import TRANSFER_DTYPES


@dataclass(frozen=True)
class RunConfig:
    """The coordinator's settings for one federated run.

    Each field's declaration is its documentation (the README's table of
    run-config keys is generated from it).
    """

    SOURCE: ClassVar[Source] = RUN_CONFIG

    num_server_rounds: int = integer("num-server-rounds", 8, "rounds of train → aggregate → "
                                     "checkpoint → evaluate", minimum=1, planned=True)
    strategy: str = choice("strategy", "fedavg", "aggregation strategy", choices=STRATEGIES)
    proximal_mu: float = number("proximal-mu", 0.01, "FedProx coefficient (strategy fedprox)",
                                minimum=0.0)
    site_weighting: str = choice("site-weighting", "cases", "how the strategy weights each "
                                 "site's update (central DP always weights them equally)",
                                 choices=SITE_WEIGHTINGS, planned=True)
    server_learning_rate: float = number("server-learning-rate", 0.05, "FedAdam's server step "
                                         "size", minimum=0.0, exclusive_minimum=True)
    min_available_nodes: int = integer("min-available-nodes", 1, "sites connected before each "
                                       "round (the simulation: the number of sites)", minimum=1)
    min_train_nodes: int = integer("min-train-nodes", 1, "sites whose weights a round needs",
                                   minimum=1)
    min_evaluate_nodes: int = integer("min-evaluate-nodes", 1, "sites evaluated each round",
                                      minimum=1)
    node_wait_timeout: float = number("node-wait-timeout", 300.0, "seconds to wait for "
                                      "min-available-nodes before failing clearly", minimum=0.0,
                                      exclusive_minimum=True)
    round_timeout: float = number("round-timeout", 3600.0, "deadline in seconds of each phase "
                                  "of a round: it goes on when every site replied or this "
                                  "passed; later replies are recorded as late, never used",
                                  minimum=0.0, exclusive_minimum=True)
    round_retries: int = integer("round-retries", 2, "times a round's training is sent again "
                                 "when fewer than min-train-nodes sites sent weights by its "
                                 "deadline, before the run stops", minimum=0)
    trim_fraction: float = number("trim-fraction", 0.2, "share of values cut at each end "
                                  "(strategy fedtrimmedavg)", minimum=0.0, maximum=0.5,
                                  exclusive_maximum=True)
    num_malicious_nodes: int = integer("num-malicious-nodes", 0, "sites assumed hostile "
                                       "(strategy krum)", minimum=0)
    update_norm_ratio: float = number("update-norm-ratio", 10.0, "an update whose norm is above "
                                      "this multiple of the typical site's is rejected",
                                      minimum=1.0, exclusive_minimum=True)
    max_update_norm: float = number("max-update-norm", 0.0, "an update whose norm is above "
                                    "this is rejected; 0: no absolute bound", minimum=0.0)
    max_model_growth: float = number("max-model-growth", 10.0, "a server step that would grow "
                                     "the global model's norm by more than this factor (or "
                                     "make it non-finite) is refused; the previous model is "
                                     "kept", minimum=1.0, exclusive_minimum=True)
    model: ModelSpec = section(ModelSpec)
    training: TrainPlan = section(TrainPlan)
    initial_model: str = text("initial-model", "", "the global model before round 1: a fedseg "
                              "checkpoint or a PyTorch state_dict file on the server's machine "
                              "(see Differential privacy); empty: seeded random weights")
    output_dir: Path = path("output-dir", Path("runs"), "where the ServerApp writes "
                            "`run-<run id>/`")
    resume_from: str = text("resume-from", "", "run folder to continue after its last finished "
                            "round, in that folder (see Resume); empty: start a fresh run")
    privacy: PrivacyRequest = section(PrivacyRequest)
    central_dp: str = choice("central-dp", "off", "client-level DP with Flower's fixed-clipping "
                             "wrappers", choices=CENTRAL_DP)
    central_dp_noise_multiplier: float = number("central-dp-noise-multiplier", 0.1, "noise of "
                                                "the central-DP wrapper", minimum=0.0)
    central_dp_clipping_norm: float = number("central-dp-clipping-norm", 10.0, "clipping norm "
                                             "of the central-DP wrapper", minimum=0.0,
                                             exclusive_minimum=True)

    def __post_init__(self) -> None:
        check(self)
        if self.min_available_nodes < max(self.min_train_nodes, self.min_evaluate_nodes):
            raise invalid(
                self, "min_available_nodes",
                f"({self.min_available_nodes}) must be at least min-train-nodes "
                f"({self.min_train_nodes}) and min-evaluate-nodes ({self.min_evaluate_nodes})",
            )
        mode = self.training.trainable
        if mode != "all" and not shared_trainable_names(self.model, mode):
            raise settings.SettingError(
                TrainPlan, "trainable", f"'{mode}' leaves no shared parameter to train, as "
                f"adaptation '{self.model.adaptation}' keeps all of them at the sites; choose "
                "decoder, head or all, or another adaptation", RUN_CONFIG)

        if (self.central_dp == "client-side"
                and TRANSFER_DTYPES[self.training.transfer_dtype] is not None):
            # The site clips in float32; rounding the clipped weights afterwards could
            # move an update past the clipping norm the noise is calibrated to.
            raise invalid(
                self, "central_dp", f"'client-side' cannot be combined with transfer-dtype "
                f"{self.training.transfer_dtype}: rounding after the site's clipping can exceed "
                "the clipping norm; use central-dp 'server-side' (the server clips in float32) "
                "or transfer-dtype 'float32'",
            )

    def plan(self, server_round: int) -> TrainPlan:
        """Return the local-training instructions for ``server_round``."""
        return replace(
            self.training, server_round=server_round, num_rounds=self.num_server_rounds,
            proximal_mu=self.proximal_mu if STRATEGIES[self.strategy].proximal else 0.0,
            # Flower's central-DP wrappers require equal weights for every update.
            uniform_weights=(CENTRAL_DP[self.central_dp].wrapper is not None
                             or SITE_WEIGHTINGS[self.site_weighting].uniform),
        )

    def round_config(self, server_round: int) -> dict[str, Any]:
        """Return everything a site needs for ``server_round``, as ConfigRecord values."""
        return {**self.model.to_config(), **self.plan(server_round).to_config(),
                **self.privacy.to_config()}

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dictionary (for the metrics history)."""
        model_keys = settings.keys(ModelSpec)
        out: dict[str, Any] = {key.replace("-", "_"): value
                               for key, value in settings.to_keys(self).items()
                               if key not in model_keys}
        out["model"] = self.model.to_config()
        return out

    @classmethod
    def from_user_config(cls, values: Mapping[str, Any],
                         plan: Mapping[str, Any] | None = None) -> RunConfig:
        """Parse and validate Flower's run config; unknown keys are refused.

        Planned keys left at ``auto`` (or absent) take ``plan``'s value, or their
        declared default when there is no plan.
        """
        settings.refuse_unknown(values, settings.keys(cls), RUN_CONFIG, "setting")
        return settings.parse(cls, settings.resolve_planned(cls, values, plan), RUN_CONFIG)

    @classmethod
    def needs_plan(cls, values: Mapping[str, Any]) -> bool:
        """Return whether ``values`` leaves any planned key to the planner."""
        return bool(settings.unplanned(cls, values))
