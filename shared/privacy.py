"""Patient-level differential privacy settings (DP-SGD): who decides what.

The site owns its privacy. The coordinator may *request* DP-SGD and *propose*
a noise multiplier and clipping norm; :func:`resolve_privacy` combines both so
that the result is never less protective than the site's own settings (more
noise, tighter clipping, the site's delta and maximum epsilon). The accounting
itself (Opacus) lives with the site, in :mod:`client.accounting`; this module
imports nothing beyond the standard library, so the server never loads Opacus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from shared.registry import Registry
from shared.settings import (
    NODE_CONFIG,
    ROUND_CONFIG,
    RUN_CONFIG,
    Source,
    check,
    choice,
    flag,
    integer,
    invalid,
    number,
    parse,
    to_wire,
)

Mechanism = str
Step = tuple[float, float, int]  # noise multiplier, sample rate, number of steps

MECHANISMS: Registry[str] = Registry("accountant", {
    "rdp": "Rényi DP (Opacus RDPAccountant)",
    "prv": "privacy random variables (Opacus PRVAccountant)",
})


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
        Per-patient gradient clipping norm.
    delta : float
        Target delta of the (epsilon, delta) guarantee.
    max_epsilon : float
        Budget: a round whose projected epsilon exceeds it is refused.
    target_epsilon : float
        Epsilon to reach after ``planned_rounds`` when calibrating the noise.
    planned_rounds : int
        Rounds the calibration spreads ``target_epsilon`` over; 0: the run's number of
        rounds, from the round config.
    accountant : str
        ``rdp`` or ``prv``.
    """

    SOURCE: ClassVar[Source] = NODE_CONFIG

    enabled: bool = flag("dp-enabled", False, "train with DP-SGD whatever the coordinator asks")
    noise_multiplier: float = number(
        "dp-noise-multiplier", 0.0, "Gaussian noise relative to the clipping norm; 0: "
        "calibrate from dp-target-epsilon over dp-planned-rounds", minimum=0.0)
    max_grad_norm: float = number("dp-max-grad-norm", 1.0, "per-patient gradient clipping norm",
                                  minimum=0.0, exclusive_minimum=True)
    delta: float = number("dp-delta", 1e-5, "delta of the (epsilon, delta) guarantee, "
                          "typically below 1/number of cases", minimum=0.0, maximum=1.0,
                          exclusive_minimum=True, exclusive_maximum=True)
    max_epsilon: float = number("dp-max-epsilon", math.inf, "budget: a round that would pass "
                                "it is refused", minimum=0.0, exclusive_minimum=True,
                                shown_default="no limit")
    target_epsilon: float = number("dp-target-epsilon", 0.0, "epsilon to reach after "
                                   "dp-planned-rounds when calibrating the noise", minimum=0.0)
    planned_rounds: int = integer("dp-planned-rounds", 0, "rounds the calibration spreads "
                                  "dp-target-epsilon over; 0: the run's num-server-rounds",
                                  minimum=0)
    accountant: Mechanism = choice("dp-accountant", "rdp", "privacy accountant",
                                   choices=MECHANISMS)

    def __post_init__(self) -> None:
        check(self)
        if self.enabled and self.noise_multiplier == 0 and self.target_epsilon <= 0:
            raise invalid(self, "noise_multiplier",
                          "is 0 with DP enabled; set it, or set dp-target-epsilon to calibrate "
                          "it (over dp-planned-rounds, by default the run's rounds)")


@dataclass(frozen=True)
class PrivacyRequest:
    """What the coordinator asks of every site's DP-SGD (sent in every round's config)."""

    SOURCE: ClassVar[Source] = RUN_CONFIG

    enabled: bool = flag("dp", False, "coordinator's request for patient-level DP-SGD at every "
                         "site (see Differential privacy)", wire="dp-requested")
    noise_multiplier: float = number("dp-noise-multiplier", 1.0, "proposed DP-SGD noise "
                                     "multiplier; a site uses the larger of this and its own",
                                     minimum=0.0, wire="dp-noise-multiplier")
    max_grad_norm: float = number("dp-max-grad-norm", 1.0, "proposed per-patient clipping norm; "
                                  "a site uses the smaller of this and its own", minimum=0.0,
                                  exclusive_minimum=True, wire="dp-max-grad-norm")

    def __post_init__(self) -> None:
        check(self)

    def to_config(self) -> dict[str, Any]:
        """Flatten into round-config keys."""
        return to_wire(self)

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> PrivacyRequest:
        """Parse the keys of :meth:`to_config`; absent keys mean "no request"."""
        return parse(cls, values, ROUND_CONFIG, by="wire")


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


def gradient_noise_std(noise_multiplier: float, max_grad_norm: float,
                       expected_units: float) -> float:
    """Return the standard deviation of the DP-SGD noise in one step's mean gradient.

    Opacus adds ``N(0, (noise_multiplier * max_grad_norm)^2)`` to every coordinate
    of the summed clipped gradients and divides the sum by the expected number of
    sampled units (``sample_rate * units``), so each coordinate of the mean
    gradient carries noise of this standard deviation.

    Parameters
    ----------
    noise_multiplier : float
        Noise relative to the clipping norm.
    max_grad_norm : float
        Per-unit clipping norm.
    expected_units : float
        Expected privacy units (patients) per batch; above 0.

    Returns
    -------
    float
        ``noise_multiplier * max_grad_norm / expected_units``.
    """
    if expected_units <= 0:
        raise ValueError(f"expected_units must be above 0, got {expected_units}")
    return noise_multiplier * max_grad_norm / expected_units


def noise_weights(noise_stds: Sequence[float]) -> list[float]:
    """Return aggregation weights that favour the sites whose updates carry less DP noise.

    Inverse-variance weighting: a site that trained under DP-SGD weighs
    ``1 / std**2``, so the noise of the weighted mean is the smallest any fixed
    weights can give (with independent noise, and ignoring what the sites' data
    differ in). A site without DP-SGD (``std`` 0) adds no noise; it weighs as much
    as the least noisy DP-SGD site, so one site that opts out does not take the
    whole model. Without any DP-SGD site every site weighs 1.

    Parameters
    ----------
    noise_stds : sequence of float
        Each site's :func:`gradient_noise_std` for the round, 0.0 without DP-SGD;
        finite and not negative.

    Returns
    -------
    list of float
        One weight per site, in order (unnormalised; FedAvg normalises).
    """
    for std in noise_stds:
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"a noise standard deviation must be finite and at least 0, "
                             f"got {std}")
    private = [1.0 / std**2 for std in noise_stds if std > 0]
    plain = max(private, default=1.0)
    return [1.0 / std**2 if std > 0 else plain for std in noise_stds]
