"""What a DP-SGD simulation starts from: the phantom families that stand in for sites' data.

Kept apart from :mod:`simulations.pretrain`, which trains, so that ``fedseg plan``
can say what a simulation would start from without loading PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.planning import Fingerprint, combine

#: Phantoms drawn and optimiser steps taken by default: about 5-8 CPU-minutes each
#: at the preset architectures of ``benchmarks.pretrain``, under one at the private plan's.
DEFAULTS: dict[str, dict[str, int]] = {
    "lung": {"cases": 160, "steps": 240, "batch": 8},
    "vessel": {"cases": 40, "steps": 900, "batch": 8},
}

#: What the sites train from a public starting model under DP-SGD: the decoder
#: (measured on chest X-ray at epsilon 8, README "Differential privacy").
DP_TRAINABLE = "decoder"


@dataclass(frozen=True)
class Profile:
    """The data a phantom family stands in for, in terms of a combined fingerprint.

    Attributes
    ----------
    spatial_dims, channels : int
        Image geometry the sites must share with the phantoms.
    min_thickness, max_thickness : float
        Range of the median structure thickness at native resolution, in pixels.
    """

    spatial_dims: int
    channels: int
    min_thickness: float
    max_thickness: float

    def fits(self, fingerprint: Fingerprint) -> bool:
        """Return whether sites with ``fingerprint`` look like this family's data."""
        # The phantoms have one foreground: a task of several structures has no family.
        return (fingerprint.spatial_dims == self.spatial_dims
                and fingerprint.channels == self.channels
                and fingerprint.classes <= 2
                and self.min_thickness <= fingerprint.thickness <= self.max_thickness)


#: Families a DP simulation may start from by itself. Only ``lung`` is here: from
#: the vessel phantoms, DP-SGD on the retina sites (13-26 images each) was measured
#: to lose what the starting model knew, so a retina-like federation starts from
#: random weights unless the run names a model.
PROFILES: dict[str, Profile] = {
    # Grey 2D images of large organs (lung fields are about 100 px thick at 512 px).
    "lung": Profile(spatial_dims=2, channels=1, min_thickness=32.0, max_thickness=float("inf")),
}


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
    return (f"fedseg simulate starts DP-SGD from the planned network pretrained on "
            f"{budget['cases']} public '{family}' phantoms ({budget['steps']} steps); the sites "
            f"train dp-trainable '{DP_TRAINABLE}' unless the run config names initial-model")
