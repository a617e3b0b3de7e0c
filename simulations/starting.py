"""What a DP-SGD simulation starts from: the phantom families that stand in for sites' data.

Kept apart from :mod:`simulations.pretrain`, which trains, so that ``fedseg plan``
can say what a simulation would start from without loading PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from shared.planning import Fingerprint, Plan, combine, make_plan

#: Phantoms drawn and optimiser steps taken by default: about 5-8 CPU-minutes each
#: at the preset architectures of ``benchmarks.pretrain``, under one at the private plan's.
DEFAULTS: dict[str, dict[str, int]] = {
    "lung": {"cases": 160, "steps": 240, "batch": 8},
    "vessel": {"cases": 40, "steps": 900, "batch": 8},
}

@dataclass(frozen=True)
class Profile:
    """The data a phantom family stands in for, in terms of a combined fingerprint.

    Attributes
    ----------
    spatial_dims, channels : int
        Image geometry the sites must share with the phantoms.
    min_thickness, max_thickness : float
        Range of the median structure thickness at native resolution, in pixels.
    recipe : mapping of str to str or float
        Run-config values a DP-SGD run from this family's model takes unless the
        run sets them: what the sites train, and how (measured per family, README
        "Differential privacy").
    full_network : bool
        Pretrain, and train, the network planned without DP-SGD. The private plan's
        smaller network is for runs that train many parameters under DP-SGD; a
        recipe that trains only normalisation layers and an adapter adds hardly
        more noise on a wide frozen body than on a narrow one.
    """

    spatial_dims: int
    channels: int
    min_thickness: float
    max_thickness: float
    recipe: Mapping[str, str | float] = field(default_factory=dict)
    full_network: bool = False

    def fits(self, fingerprint: Fingerprint) -> bool:
        """Return whether sites with ``fingerprint`` look like this family's data."""
        # The phantoms have one foreground: a task of several structures has no family.
        return (fingerprint.spatial_dims == self.spatial_dims
                and fingerprint.channels == self.channels
                and fingerprint.classes <= 2
                and self.min_thickness <= fingerprint.thickness <= self.max_thickness)


#: Families a DP simulation may start from by itself, each with its recipe.
PROFILES: dict[str, Profile] = {
    # Grey 2D images of large organs (lung fields are about 100 px thick at 512 px).
    # Chest X-ray at epsilon 8: the private plan's network, its decoder trained.
    "lung": Profile(spatial_dims=2, channels=1, min_thickness=32.0, max_thickness=float("inf"),
                    recipe={"dp-trainable": "decoder"}),
    # Colour 2D images of thin structures (retinal vessels are 6-11 px thick at
    # native resolution). Retina at epsilon 8 (13-26 images a site): training the
    # decoder lost what the starting model knew; the normalisation layers and a
    # site-local input adapter, at dp-learning-rate 0.01 (not the default 0.05),
    # kept it and beat each site alone on the mean of 3 seeds.
    "vessel": Profile(spatial_dims=2, channels=3, min_thickness=1.0, max_thickness=16.0,
                      recipe={"dp-trainable": "norm+adapter", "adaptation": "adapter",
                              "dp-learning-rate": 0.01},
                      full_network=True),
}


def plan_without_dp(fingerprints: Sequence[Fingerprint]) -> Plan:
    """Return the plan the sites would get if none trained under DP-SGD."""
    return make_plan([replace(fp, dp_patients=0) for fp in fingerprints])


def choose_family(fingerprints: Sequence[Fingerprint]) -> str | None:
    """Return the first family of :data:`PROFILES` the sites' combined fingerprint fits."""
    combined = combine(fingerprints)
    return next((name for name, p in PROFILES.items() if p.fits(combined)), None)


def starting_model(fingerprints: Sequence[Fingerprint]) -> str:
    """Say what a planned DP-SGD simulation of these sites starts from, in one line.

    ``fedseg plan`` prints it; :func:`simulations.pretrain.public_start` acts on the
    same choice.
    """
    family = choose_family(fingerprints)
    if family is None:
        return ("no public phantom family fits these sites: DP-SGD trains every parameter from "
                "random weights (name a starting model with --run-config \"initial-model=...\")")
    budget = DEFAULTS[family]
    profile = PROFILES[family]
    network = "planned network"
    if profile.full_network:
        channels = ",".join(map(str, plan_without_dp(fingerprints).channels))
        network = f"network planned without DP-SGD (channels '{channels}')"
    recipe = " ".join(f"{key}={value!r}" for key, value in profile.recipe.items())
    return (f"fedseg simulate starts DP-SGD from the {network} pretrained on "
            f"{budget['cases']} public '{family}' phantoms ({budget['steps']} steps), with "
            f"{recipe} unless the run config names initial-model")
