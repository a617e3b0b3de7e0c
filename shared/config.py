"""Frozen, validated configuration for each side of a federation.

Three objects, each parsed once from the place its owner controls:

* :class:`RunConfig` — the coordinator's run config (``[tool.flwr.app.config]`` in
  ``pyproject.toml``, overridable with ``flwr run --run-config``). Parsed on the server.
* :class:`TrainPlan` and :class:`ModelSpec` — the part of the run config a site needs
  for one round. The server puts them into every message's ``ConfigRecord``; the site
  parses them from there, so a site never depends on the coordinator's files.
* :class:`SiteConfig` — the hospital's node config (``flower-supernode --node-config``).
  Only the site sets it; nothing in a message can change it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from shared.errors import ConfigError
from shared.partition import ADAPTATIONS, Adaptation
from shared.privacy import Mechanism, PrivacyRequest, SitePrivacy

RUN_CONFIG = "run config"
NODE_CONFIG = "node config"
ROUND_CONFIG = "round config from the server"

Strategy = Literal["fedavg", "fedprox", "fedadam"]
CentralDP = Literal["off", "server-side", "client-side"]
CENTRAL_DP: tuple[CentralDP, ...] = ("off", "server-side", "client-side")
Network = Literal["unet", "basicunet", "segresnet"]
Norm = Literal["instance", "group"]

STRATEGIES: tuple[Strategy, ...] = ("fedavg", "fedprox", "fedadam")
NETWORKS: tuple[Network, ...] = ("unet", "basicunet", "segresnet")
NORMS: tuple[Norm, ...] = ("instance", "group")

_RUN_FIX = "set it in [tool.flwr.app.config] of pyproject.toml or with --run-config"
_NODE_FIX = "set it with flower-supernode --node-config or the site's config file"


class _Reader:
    """Typed access to one flat config mapping, with errors naming the key."""

    def __init__(self, values: Mapping[str, Any], source: str, fix: str) -> None:
        self.values = values
        self.source = source
        self.fix = fix

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem, self.fix)

    def _get(self, key: str, default: Any) -> Any:
        if key in self.values:
            return self.values[key]
        if default is _REQUIRED:
            raise self.error(key, "is required but missing")
        return default

    def get_int(self, key: str, default: Any = None, minimum: int | None = None) -> int:
        raw = self._get(key, default)
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise self.error(key, f"expected an integer, got {raw!r}")
        try:
            value = int(raw)
        except ValueError:
            raise self.error(key, f"expected an integer, got {raw!r}") from None
        if isinstance(raw, float) and raw != value:
            raise self.error(key, f"expected an integer, got {raw!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def get_float(
        self,
        key: str,
        default: Any = None,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
        exclusive_maximum: bool = False,
    ) -> float:
        raw = self._get(key, default)
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise self.error(key, f"expected a number, got {raw!r}")
        try:
            value = float(raw)
        except ValueError:
            raise self.error(key, f"expected a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise self.error(key, f"must be a finite number, got {raw!r}")
        if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
            bound = "greater than" if exclusive_minimum else "at least"
            raise self.error(key, f"must be {bound} {minimum}, got {value}")
        if maximum is not None and (value > maximum or (exclusive_maximum and value == maximum)):
            bound = "less than" if exclusive_maximum else "at most"
            raise self.error(key, f"must be {bound} {maximum}, got {value}")
        return value

    def get_bool(self, key: str, default: Any = None) -> bool:
        raw = self._get(key, default)
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise self.error(key, f"expected true or false, got {raw!r}")

    def get_str(self, key: str, default: Any = None) -> str:
        raw = self._get(key, default)
        if not isinstance(raw, str):
            raise self.error(key, f"expected a string, got {raw!r}")
        return raw

    def get_choice(self, key: str, choices: tuple[str, ...], default: Any = None) -> str:
        value = self.get_str(key, default).strip().lower()
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def get_ints(self, key: str, default: Any = None, minimum: int = 1) -> tuple[int, ...]:
        raw = self._get(key, default)
        if isinstance(raw, int) and not isinstance(raw, bool):
            parts = [str(raw)]
        elif isinstance(raw, str):
            parts = [p for p in re.split(r"[,\sx]+", raw.strip()) if p]
        else:
            raise self.error(key, f"expected comma-separated integers, got {raw!r}")
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise self.error(key, f"expected comma-separated integers, got {raw!r}") from None
        if not values:
            raise self.error(key, "must list at least one integer")
        if any(v < minimum for v in values):
            raise self.error(key, f"every value must be at least {minimum}, got {raw!r}")
        return values


_REQUIRED = object()


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of the shared network; identical at every site and the server.

    Attributes
    ----------
    network : str
        MONAI architecture: ``unet``, ``basicunet`` or ``segresnet``.
    norm : str
        ``instance`` or ``group``; BatchNorm is never used (Opacus rejects it, and
        its running statistics would leak site data into the shared weights).
    channels : tuple of int
        Feature channels per resolution level (``unet``, ``basicunet``: first
        five used; ``segresnet``: first value is ``init_filters``).
    in_channels : int
        Image channels the network expects (1 grey, 3 RGB).
    num_classes : int
        Output classes including background (2 for a binary mask).
    patch_size : tuple of int
        Training patch and sliding-window size; its length sets 2D or 3D.
    adaptation : str
        Which layers stay at each site (see :mod:`shared.partition`).
    """

    network: Network = "unet"
    norm: Norm = "instance"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    in_channels: int = 1
    num_classes: int = 2
    patch_size: tuple[int, ...] = (64, 64)
    adaptation: Adaptation = "none"

    def __post_init__(self) -> None:
        reader = _Reader({}, RUN_CONFIG, _RUN_FIX)
        if self.network not in NETWORKS:
            raise reader.error("network", f"must be one of {', '.join(NETWORKS)}")
        if self.norm not in NORMS:
            raise reader.error("norm", f"must be one of {', '.join(NORMS)}")
        if self.adaptation not in ADAPTATIONS:
            raise reader.error("adaptation", f"must be one of {', '.join(ADAPTATIONS)}")
        if len(self.patch_size) not in (2, 3):
            raise reader.error(
                "patch-size", f"needs 2 (2D) or 3 (3D) values, got {_csv(self.patch_size)}"
            )
        if self.network == "unet" and len(self.channels) < 2:
            raise reader.error("channels", "unet needs at least two levels, e.g. '16,32,64'")
        if self.network == "basicunet" and len(self.channels) < 6:
            raise reader.error("channels", "basicunet needs six values, e.g. '16,16,32,64,128,16'")
        factor = self.downsampling_factor
        if any(p % factor for p in self.patch_size):
            raise reader.error(
                "patch-size",
                f"every value must be divisible by {factor} for {self.network} with "
                f"{len(self.channels)} levels, got {_csv(self.patch_size)}",
            )
        if self.in_channels < 1 or self.num_classes < 2:
            raise reader.error("num-classes", "needs in-channels >= 1 and num-classes >= 2")

    @property
    def norm_groups(self) -> int:
        """Groups of GroupNorm: the largest of 8, 4, 2, 1 dividing every normalised width.

        MONAI's UNet also normalises its last up-sampling output, whose width is
        ``num_classes``, so that width counts too.
        """
        widths = [*self.channels]
        if self.network == "unet":
            widths.append(self.num_classes)
        return next(g for g in (8, 4, 2, 1) if all(w % g == 0 for w in widths))

    @property
    def spatial_dims(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.patch_size)

    @property
    def downsampling_factor(self) -> int:
        """Factor every input side must be divisible by."""
        if self.network == "basicunet":
            return 16
        if self.network == "segresnet":
            return 8
        return int(2 ** (len(self.channels) - 1))

    def to_config(self) -> dict[str, Any]:
        """Flatten into ``model-*`` keys for a ``ConfigRecord`` or checkpoint."""
        return {
            "model-network": self.network,
            "model-norm": self.norm,
            "model-channels": _csv(self.channels),
            "model-in-channels": self.in_channels,
            "model-num-classes": self.num_classes,
            "model-patch-size": _csv(self.patch_size),
            "model-adaptation": self.adaptation,
        }

    @classmethod
    def from_config(cls, values: Mapping[str, Any], source: str = ROUND_CONFIG) -> ModelSpec:
        """Parse the ``model-*`` keys written by :meth:`to_config`."""
        r = _Reader(values, source, "the server and the site must run the same fedseg version")
        return cls(
            network=cast(Network, r.get_choice("model-network", NETWORKS, _REQUIRED)),
            norm=cast(Norm, r.get_choice("model-norm", NORMS, _REQUIRED)),
            channels=r.get_ints("model-channels", _REQUIRED),
            in_channels=r.get_int("model-in-channels", _REQUIRED, minimum=1),
            num_classes=r.get_int("model-num-classes", _REQUIRED, minimum=2),
            patch_size=r.get_ints("model-patch-size", _REQUIRED),
            adaptation=cast(Adaptation, r.get_choice("model-adaptation", ADAPTATIONS, "none")),
        )


@dataclass(frozen=True)
class TrainPlan:
    """What the coordinator asks of a site for one round of local training.

    Attributes
    ----------
    server_round : int
        Round number, from 1.
    local_epochs : int
        Passes over the site's training cases (used when ``local_steps`` is 0).
    local_steps : int
        Exact number of optimiser steps; 0 means "use ``local_epochs``".
    batch_size : int
        Cases per step; each drawn case contributes one patch.
    learning_rate : float
        Adam learning rate of the local optimiser.
    proximal_mu : float
        FedProx coefficient; 0 disables the proximal term.
    seed : int
        Base seed; a site mixes in the round number and its own seed.
    """

    server_round: int = 1
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 8
    learning_rate: float = 3e-3
    proximal_mu: float = 0.0
    seed: int = 0

    def to_config(self) -> dict[str, Any]:
        """Flatten into keys for a ``ConfigRecord``."""
        return {
            "server-round": self.server_round,
            "local-epochs": self.local_epochs,
            "local-steps": self.local_steps,
            "batch-size": self.batch_size,
            "learning-rate": self.learning_rate,
            "proximal-mu": self.proximal_mu,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, values: Mapping[str, Any], source: str = ROUND_CONFIG) -> TrainPlan:
        """Parse the keys written by :meth:`to_config` (FedProx adds ``proximal-mu``)."""
        r = _Reader(values, source, "the server and the site must run the same fedseg version")
        d = cls()
        return cls(
            server_round=r.get_int("server-round", d.server_round, minimum=0),
            local_epochs=r.get_int("local-epochs", d.local_epochs, minimum=1),
            local_steps=r.get_int("local-steps", d.local_steps, minimum=0),
            batch_size=r.get_int("batch-size", d.batch_size, minimum=1),
            learning_rate=r.get_float("learning-rate", d.learning_rate, minimum=0.0,
                                      exclusive_minimum=True),
            proximal_mu=r.get_float("proximal-mu", d.proximal_mu, minimum=0.0),
            seed=r.get_int("seed", d.seed),
        )


@dataclass(frozen=True)
class RunConfig:
    """The coordinator's settings for one federated run, validated once.

    Attributes
    ----------
    num_server_rounds : int
        Rounds of train-then-evaluate.
    strategy : str
        ``fedavg``, ``fedprox`` or ``fedadam``.
    proximal_mu : float
        FedProx coefficient (used when ``strategy`` is ``fedprox``).
    server_learning_rate : float
        FedAdam's server step size ``eta``.
    min_available_nodes, min_train_nodes, min_evaluate_nodes : int
        Sites that must be connected / trained / evaluated each round.
    node_wait_timeout : float
        Seconds to wait for ``min_available_nodes`` before failing the run.
    round_timeout : float
        Seconds to wait for replies in one round.
    model : ModelSpec
        The shared network.
    local_epochs, local_steps, batch_size, learning_rate, seed
        Local training settings sent to every site (see :class:`TrainPlan`).
    output_dir : Path
        Folder under which the run's checkpoints and metrics are written.
    dp, dp_noise_multiplier, dp_max_grad_norm
        The coordinator's request for sample-level DP-SGD at every site; a site
        applies it only where it is stricter than the site's own settings.
    central_dp : str
        Client-level DP with Flower's fixed-clipping wrappers: ``off``,
        ``server-side`` or ``client-side``.
    central_dp_noise_multiplier, central_dp_clipping_norm
        Settings of those wrappers.
    """

    num_server_rounds: int = 8
    strategy: Strategy = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.05
    min_available_nodes: int = 1
    min_train_nodes: int = 1
    min_evaluate_nodes: int = 1
    node_wait_timeout: float = 300.0
    round_timeout: float = 3600.0
    model: ModelSpec = field(default_factory=ModelSpec)
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 8
    learning_rate: float = 3e-3
    seed: int = 0
    output_dir: Path = Path("runs")
    dp: bool = False
    dp_noise_multiplier: float = 1.0
    dp_max_grad_norm: float = 1.0
    central_dp: CentralDP = "off"
    central_dp_noise_multiplier: float = 0.1
    central_dp_clipping_norm: float = 10.0

    def __post_init__(self) -> None:
        reader = _Reader({}, RUN_CONFIG, _RUN_FIX)
        if self.min_available_nodes < max(self.min_train_nodes, self.min_evaluate_nodes):
            raise reader.error(
                "min-available-nodes",
                f"({self.min_available_nodes}) must be at least min-train-nodes "
                f"({self.min_train_nodes}) and min-evaluate-nodes ({self.min_evaluate_nodes})",
            )

    def plan(self, server_round: int) -> TrainPlan:
        """Return the local-training instructions for ``server_round``."""
        return TrainPlan(
            server_round=server_round,
            local_epochs=self.local_epochs,
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            proximal_mu=self.proximal_mu if self.strategy == "fedprox" else 0.0,
            seed=self.seed,
        )

    def privacy_request(self) -> PrivacyRequest:
        """Return what the coordinator asks of every site's DP-SGD."""
        return PrivacyRequest(self.dp, self.dp_noise_multiplier, self.dp_max_grad_norm)

    def round_config(self, server_round: int) -> dict[str, Any]:
        """Return everything a site needs for ``server_round``, as ConfigRecord values."""
        return {
            **self.model.to_config(),
            **self.plan(server_round).to_config(),
            **self.privacy_request().to_config(),
            # Flower's central-DP wrappers require equal weights for every update.
            "uniform-weights": self.central_dp != "off",
        }

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dictionary (for the metrics history)."""
        out = asdict(self)
        out["model"] = self.model.to_config()
        out["output_dir"] = str(self.output_dir)
        return out

    @classmethod
    def from_user_config(cls, values: Mapping[str, Any]) -> RunConfig:
        """Parse and validate Flower's run config; unknown keys are rejected."""
        unknown = sorted(set(values) - _RUN_KEYS)
        if unknown:
            raise ConfigError(
                RUN_CONFIG, unknown[0], "is not a fedseg setting",
                f"remove it or use one of: {', '.join(sorted(_RUN_KEYS))}",
            )
        d = cls()
        r = _Reader(values, RUN_CONFIG, _RUN_FIX)
        model = ModelSpec(
            network=cast(Network, r.get_choice("network", NETWORKS, d.model.network)),
            norm=cast(Norm, r.get_choice("norm", NORMS, d.model.norm)),
            channels=r.get_ints("channels", _csv(d.model.channels)),
            in_channels=r.get_int("in-channels", d.model.in_channels, minimum=1),
            num_classes=r.get_int("num-classes", d.model.num_classes, minimum=2),
            patch_size=r.get_ints("patch-size", _csv(d.model.patch_size)),
            adaptation=cast(Adaptation, r.get_choice("adaptation", ADAPTATIONS,
                                                     d.model.adaptation)),
        )
        return cls(
            num_server_rounds=r.get_int("num-server-rounds", d.num_server_rounds, minimum=1),
            strategy=cast(Strategy, r.get_choice("strategy", STRATEGIES, d.strategy)),
            proximal_mu=r.get_float("proximal-mu", d.proximal_mu, minimum=0.0),
            server_learning_rate=r.get_float(
                "server-learning-rate", d.server_learning_rate, minimum=0.0, exclusive_minimum=True
            ),
            min_available_nodes=r.get_int("min-available-nodes", d.min_available_nodes, minimum=1),
            min_train_nodes=r.get_int("min-train-nodes", d.min_train_nodes, minimum=1),
            min_evaluate_nodes=r.get_int("min-evaluate-nodes", d.min_evaluate_nodes, minimum=1),
            node_wait_timeout=r.get_float(
                "node-wait-timeout", d.node_wait_timeout, minimum=0.0, exclusive_minimum=True
            ),
            round_timeout=r.get_float(
                "round-timeout", d.round_timeout, minimum=0.0, exclusive_minimum=True
            ),
            model=model,
            local_epochs=r.get_int("local-epochs", d.local_epochs, minimum=1),
            local_steps=r.get_int("local-steps", d.local_steps, minimum=0),
            batch_size=r.get_int("batch-size", d.batch_size, minimum=1),
            learning_rate=r.get_float(
                "learning-rate", d.learning_rate, minimum=0.0, exclusive_minimum=True
            ),
            seed=r.get_int("seed", d.seed),
            output_dir=Path(r.get_str("output-dir", str(d.output_dir))),
            dp=r.get_bool("dp", d.dp),
            dp_noise_multiplier=r.get_float("dp-noise-multiplier", d.dp_noise_multiplier,
                                            minimum=0.0),
            dp_max_grad_norm=r.get_float("dp-max-grad-norm", d.dp_max_grad_norm, minimum=0.0,
                                         exclusive_minimum=True),
            central_dp=cast(CentralDP, r.get_choice("central-dp", CENTRAL_DP, d.central_dp)),
            central_dp_noise_multiplier=r.get_float(
                "central-dp-noise-multiplier", d.central_dp_noise_multiplier, minimum=0.0),
            central_dp_clipping_norm=r.get_float(
                "central-dp-clipping-norm", d.central_dp_clipping_norm, minimum=0.0,
                exclusive_minimum=True),
        )


_RUN_KEYS = frozenset(
    {
        "num-server-rounds", "strategy", "adaptation", "proximal-mu", "server-learning-rate",
        "min-available-nodes", "min-train-nodes", "min-evaluate-nodes",
        "node-wait-timeout", "round-timeout", "network", "norm", "channels",
        "in-channels", "num-classes", "patch-size", "local-epochs", "local-steps",
        "batch-size", "learning-rate", "seed", "output-dir", "dp", "dp-noise-multiplier",
        "dp-max-grad-norm", "central-dp", "central-dp-noise-multiplier",
        "central-dp-clipping-norm",
    }
)

Device = str


@dataclass(frozen=True)
class SiteConfig:
    """A hospital's own settings, from its SuperNode's node config.

    Attributes
    ----------
    data_path : Path
        The site's data folder (Decathlon layout).
    site_name : str
        Name used in the server's metrics history; defaults to the folder's name.
    state_dir : Path
        Folder for the site's own state (local layers, privacy accountant).
    device : str
        ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    val_fraction : float
        Share of patients held out for validation, chosen deterministically.
    patient_pattern : str
        Optional regular expression whose first group is the patient id of a
        case's file name (cases of one patient never straddle the split).
    num_threads : int
        CPU threads for PyTorch; 0 keeps PyTorch's default.
    amp : bool
        Mixed precision on CUDA.
    seed : int
        Site seed, mixed with the round number for local training.
    privacy : SitePrivacy
        The site's DP-SGD settings and budget (``dp-*`` keys); see
        :mod:`shared.privacy`.
    """

    data_path: Path
    site_name: str = ""
    state_dir: Path = Path()
    device: Device = "auto"
    val_fraction: float = 0.2
    patient_pattern: str = ""
    num_threads: int = 0
    amp: bool = False
    seed: int = 0
    privacy: SitePrivacy = field(default_factory=SitePrivacy)

    def __post_init__(self) -> None:
        if not self.site_name:
            object.__setattr__(self, "site_name", self.data_path.name or "site")
        if self.state_dir == Path():
            object.__setattr__(self, "state_dir", Path("fedseg-state") / self.site_name)
        reader = _Reader({}, NODE_CONFIG, _NODE_FIX)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise reader.error("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise reader.error("val-fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.patient_pattern:
            try:
                compiled = re.compile(self.patient_pattern)
            except re.error as exc:
                raise reader.error("patient-pattern", f"is not a valid regex ({exc})") from None
            if compiled.groups < 1:
                raise reader.error("patient-pattern", "needs one capture group: the patient id")

    @classmethod
    def from_node_config(cls, values: Mapping[str, Any]) -> SiteConfig:
        """Parse and validate a SuperNode's node config; a misspelt key is an error."""
        unknown = sorted(set(values) - _NODE_KEYS - _FLOWER_NODE_KEYS)
        if unknown:
            # A typo such as 'dp-enabeld' must not silently train without privacy.
            raise ConfigError(NODE_CONFIG, unknown[0], "is not a fedseg site setting",
                              f"remove it or use one of: {', '.join(sorted(_NODE_KEYS))}")
        r = _Reader(values, NODE_CONFIG, _NODE_FIX)
        data_path = Path(r.get_str("data-path", _REQUIRED)).expanduser()
        state = r.get_str("state-dir", "")
        return cls(
            data_path=data_path,
            site_name=r.get_str("site-name", ""),
            state_dir=Path(state).expanduser() if state else Path(),
            device=r.get_str("device", "auto").strip().lower(),
            val_fraction=r.get_float("val-fraction", 0.2, minimum=0.0, maximum=1.0,
                                 exclusive_maximum=True),
            patient_pattern=r.get_str("patient-pattern", ""),
            num_threads=r.get_int("num-threads", 0, minimum=0),
            amp=r.get_bool("amp", False),
            seed=r.get_int("seed", 0),
            privacy=SitePrivacy(
                enabled=r.get_bool("dp-enabled", False),
                noise_multiplier=r.get_float("dp-noise-multiplier", 0.0, minimum=0.0),
                max_grad_norm=r.get_float("dp-max-grad-norm", 1.0, minimum=0.0,
                                          exclusive_minimum=True),
                delta=r.get_float("dp-delta", 1e-5, minimum=0.0, maximum=1.0,
                                  exclusive_minimum=True, exclusive_maximum=True),
                max_epsilon=r.get_float("dp-max-epsilon", float("inf"), minimum=0.0,
                                        exclusive_minimum=True) if "dp-max-epsilon" in values
                else float("inf"),
                target_epsilon=r.get_float("dp-target-epsilon", 0.0, minimum=0.0),
                planned_rounds=r.get_int("dp-planned-rounds", 0, minimum=0),
                accountant=cast(Mechanism, r.get_choice("dp-accountant", ("rdp", "prv"), "rdp")),
            ),
        )


_NODE_KEYS = frozenset(
    {
        "data-path", "site-name", "state-dir", "device", "val-fraction", "patient-pattern",
        "num-threads", "amp", "seed", "dp-enabled", "dp-noise-multiplier", "dp-max-grad-norm",
        "dp-delta", "dp-max-epsilon", "dp-target-epsilon", "dp-planned-rounds", "dp-accountant",
    }
)
# Keys Flower itself puts into a node config (simulation engine).
_FLOWER_NODE_KEYS = frozenset({"partition-id", "num-partitions"})
