"""Sample-level differential privacy: who decides what, and how much was spent.

The site owns its privacy. The coordinator may *request* DP-SGD and *propose*
a noise multiplier and clipping norm; :func:`resolve_privacy` combines both so
that the result is never less protective than the site's own settings (more
noise, tighter clipping, the site's delta and maximum epsilon). Epsilon is
computed with Opacus's accountants from the full history of
``(noise_multiplier, sample_rate, steps)`` triples, so it is cumulative over
every round the site ever trained.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from shared.errors import ConfigError

Mechanism = Literal["rdp", "prv"]
Step = tuple[float, float, int]  # noise multiplier, sample rate, number of steps

_NODE_FIX = "set it with flower-supernode --node-config or the site's config file"


@dataclass(frozen=True)
class SitePrivacy:
    """A site's own privacy settings (node config ``dp-*`` keys).

    Attributes
    ----------
    enabled : bool
        Train with DP-SGD whatever the coordinator asks.
    noise_multiplier : float
        Gaussian noise std relative to ``max_grad_norm``; 0 means "calibrate from
        ``target_epsilon`` over ``planned_rounds``".
    max_grad_norm : float
        Per-case gradient clipping norm.
    delta : float
        Target delta of the (epsilon, delta) guarantee.
    max_epsilon : float
        Budget: a round whose projected epsilon exceeds it is refused.
    target_epsilon : float
        Epsilon to reach after ``planned_rounds`` when calibrating the noise.
    planned_rounds : int
        Rounds the calibration spreads ``target_epsilon`` over.
    accountant : str
        ``rdp`` or ``prv``.
    """

    enabled: bool = False
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    max_epsilon: float = math.inf
    target_epsilon: float = 0.0
    planned_rounds: int = 0
    accountant: Mechanism = "rdp"

    def __post_init__(self) -> None:
        def err(key: str, problem: str) -> ConfigError:
            return ConfigError("node config", key, problem, _NODE_FIX)

        if self.noise_multiplier < 0:
            raise err("dp-noise-multiplier", "must be at least 0")
        if self.max_grad_norm <= 0:
            raise err("dp-max-grad-norm", "must be greater than 0")
        if not 0 < self.delta < 1:
            raise err("dp-delta", "must be in (0, 1), typically below 1/number of cases")
        if self.max_epsilon <= 0:
            raise err("dp-max-epsilon", "must be greater than 0")
        if self.accountant not in ("rdp", "prv"):
            raise err("dp-accountant", "must be 'rdp' or 'prv'")
        if self.enabled and self.noise_multiplier == 0 and (
                self.target_epsilon <= 0 or self.planned_rounds <= 0):
            raise err("dp-noise-multiplier",
                      "is 0 with DP enabled; set it, or set dp-target-epsilon and "
                      "dp-planned-rounds to calibrate it")


@dataclass(frozen=True)
class PrivacyRequest:
    """What the coordinator asks for (sent in every round's config)."""

    enabled: bool = False
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0

    def to_config(self) -> dict[str, Any]:
        """Flatten into round-config keys."""
        return {"dp-requested": self.enabled, "dp-noise-multiplier": self.noise_multiplier,
                "dp-max-grad-norm": self.max_grad_norm}

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> PrivacyRequest:
        """Parse the keys of :meth:`to_config`; absent keys mean "no request"."""
        return cls(enabled=bool(values.get("dp-requested", False)),
                   noise_multiplier=float(values.get("dp-noise-multiplier", 0.0)),
                   max_grad_norm=float(values.get("dp-max-grad-norm", 1.0)))


@dataclass(frozen=True)
class PrivacySettings:
    """The DP-SGD settings a site actually trains with."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    max_epsilon: float
    accountant: Mechanism
    target_epsilon: float = 0.0
    planned_rounds: int = 0


def resolve_privacy(site: SitePrivacy, request: PrivacyRequest) -> PrivacySettings | None:
    """Combine the site's settings with the coordinator's request; never weaken the site's.

    Returns
    -------
    PrivacySettings or None
        ``None`` when neither side asks for DP. Otherwise the larger noise
        multiplier, the smaller clipping norm, and the site's delta, budget and
        accountant: nothing in a request can raise ``max_epsilon`` or lower noise.
    """
    if not site.enabled and not request.enabled:
        return None
    noises = [site.noise_multiplier] if site.enabled else []
    clips = [site.max_grad_norm] if site.enabled else []
    if request.enabled:
        noises.append(max(0.0, request.noise_multiplier))
        if request.max_grad_norm > 0:
            clips.append(request.max_grad_norm)
    return PrivacySettings(
        noise_multiplier=max(noises),
        max_grad_norm=min(clips) if clips else site.max_grad_norm,
        delta=site.delta,
        max_epsilon=site.max_epsilon,
        accountant=site.accountant,
        target_epsilon=site.target_epsilon,
        planned_rounds=site.planned_rounds,
    )


def compute_epsilon(history: Sequence[Step], delta: float, mechanism: Mechanism) -> float:
    """Return the epsilon spent by all ``history`` steps (0 for an empty history)."""
    steps = [(float(n), float(q), int(k)) for n, q, k in history if k > 0]
    if not steps:
        return 0.0
    accountant = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    accountant.history = steps
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    mechanism: Mechanism) -> float:
    """Return the noise multiplier that spends ``target_epsilon`` in ``steps`` steps."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=mechanism))


def sample_rate(batch_size: int, num_cases: int) -> float:
    """Return Poisson sampling's per-case rate, as Opacus derives it from a DataLoader."""
    return 1.0 / math.ceil(num_cases / batch_size)
