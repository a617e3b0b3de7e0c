"""Which parameters are shared with the federation and which stay at the site.

Chosen by module type (never by substring of a parameter name):

* ``none`` — everything is shared (plain FedAvg).
* ``local-norm`` — the affine parameters of every InstanceNorm/GroupNorm layer stay
  at the site (FedBN-style).
* ``adapter`` — the :class:`~shared.networks.InputAdapter` in front of the shared
  network stays at the site (per-site intensity/colour harmonisation).
* ``adapter+local-norm`` — both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeVar

from torch import nn

Adaptation = Literal["none", "local-norm", "adapter", "adapter+local-norm"]
ADAPTATIONS: tuple[Adaptation, ...] = ("none", "local-norm", "adapter", "adapter+local-norm")

LOCAL_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm,
)

T = TypeVar("T")


def uses_adapter(mode: Adaptation) -> bool:
    """Return whether ``mode`` puts a site-local input adapter in front of the network."""
    return mode in ("adapter", "adapter+local-norm")


def local_parameter_names(net: nn.Module, mode: Adaptation) -> frozenset[str]:
    """Return the names (as in ``net.state_dict()``) of the site-local parameters."""
    from shared.networks import InputAdapter

    local_norm = mode in ("local-norm", "adapter+local-norm")
    names: set[str] = set()
    for module_name, module in net.named_modules():
        is_local = (local_norm and isinstance(module, LOCAL_NORM_TYPES)) or (
            uses_adapter(mode) and isinstance(module, InputAdapter))
        if not is_local:
            continue
        prefix = f"{module_name}." if module_name else ""
        names.update(prefix + name for name, _ in module.named_parameters())
    return frozenset(names)


def split_weights(weights: Mapping[str, T], local: frozenset[str]
                  ) -> tuple[dict[str, T], dict[str, T]]:
    """Split ``weights`` into (shared, site-local) dictionaries, order preserved."""
    shared = {k: v for k, v in weights.items() if k not in local}
    site = {k: v for k, v in weights.items() if k in local}
    return shared, site
