"""Which parameters are shared with the federation and which stay at the site.

Every adaptation mode is one entry of :data:`ADAPTATIONS`: it selects site-local
modules by type (never by substring of a parameter name), or by type and position
(the segmentation head), and may put a site-local :class:`InputAdapter` in front
of the shared network. The local head (FedPer/FedRep-style personalisation) is
one such entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from shared.registry import Registry

LOCAL_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm,
)
CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)

T = TypeVar("T")


class InputAdapter(nn.Module):
    """A per-site 1x1 convolution that harmonises intensities and colours.

    It starts as the identity, so an adapted network begins exactly as the
    shared one, and it learns each scanner's intensity/colour mapping locally.
    """

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.mix = conv(channels, channels, kernel_size=1)
        with torch.no_grad():
            self.mix.weight.zero_()
            for c in range(channels):
                self.mix.weight[(c, c) + (0,) * spatial_dims] = 1.0
            assert self.mix.bias is not None
            self.mix.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the site's channel mixing."""
        return self.mix(x)


class AdaptedNetwork(nn.Module):
    """The shared network behind a site-local :class:`InputAdapter`."""

    def __init__(self, adapter: InputAdapter, backbone: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Harmonise the input, then segment it."""
        return self.backbone(self.adapter(x))


Selector = Callable[[nn.Module], bool]
"""Decides whether a module's parameters stay at the site."""

Picker = Callable[[nn.Module], Iterable[nn.Module]]
"""Chooses modules of a whole network (for a choice that depends on their position)."""


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, LOCAL_NORM_TYPES)


def _is_adapter(module: nn.Module) -> bool:
    return isinstance(module, InputAdapter)


def segmentation_head(net: nn.Module) -> list[nn.Module]:
    """Return the convolutions at the end of ``net`` that output class-score maps.

    Walking the convolutions backwards in registration order (which is their order
    in the forward pass for every network of :data:`shared.networks.NETWORKS`), the
    head is the trailing run as wide as the last one, i.e. ``num_classes`` wide:
    MONAI UNet's last up-sampling convolution (features to class maps) and its
    final convolution; BasicUNet's and SegResNet's final 1x1 convolution. The
    normalisation between them stays shared (``local-norm`` keeps norms local).
    """
    convs = [m for m in net.modules() if isinstance(m, CONV_TYPES)]
    if not convs:
        return []
    width = convs[-1].out_channels
    head: list[nn.Module] = []
    for conv in reversed(convs):
        if conv.out_channels != width:
            break
        head.append(conv)
    return head[::-1]


@dataclass(frozen=True)
class AdaptationMode:
    """One way of keeping layers at the site.

    Attributes
    ----------
    doc : str
        What stays at the site, for the README.
    local : tuple of callables
        A module whose type any of these accepts keeps its parameters at the site.
    input_adapter : bool
        Put a site-local :class:`InputAdapter` in front of the shared network.
    pick : callable or None
        Chooses further site-local modules from the whole network.
    """

    doc: str
    local: tuple[Selector, ...] = ()
    input_adapter: bool = False
    pick: Picker | None = None


ADAPTATIONS: Registry[AdaptationMode] = Registry("adaptation", {
    "none": AdaptationMode("nothing (plain FedAvg)"),
    "local-norm": AdaptationMode(
        "affine parameters of every InstanceNorm/GroupNorm (FedBN-style)", (_is_norm,)),
    "adapter": AdaptationMode(
        "a per-site 1x1-convolution input harmoniser (identity at start) in front of the "
        "shared network", (_is_adapter,), input_adapter=True),
    "adapter+local-norm": AdaptationMode("both", (_is_adapter, _is_norm), input_adapter=True),
    "local-head": AdaptationMode(
        "the segmentation head: the final convolutions that output class maps "
        "(FedPer/FedRep-style personalisation)", pick=segmentation_head),
})


def uses_adapter(mode: str) -> bool:
    """Return whether ``mode`` puts a site-local input adapter in front of the network."""
    return ADAPTATIONS[mode].input_adapter


def adapt(net: nn.Module, mode: str, in_channels: int, spatial_dims: int) -> nn.Module:
    """Return ``net`` with the site-local modules ``mode`` adds (the network itself if none)."""
    if uses_adapter(mode):
        return AdaptedNetwork(InputAdapter(in_channels, spatial_dims), net)
    return net


def local_parameter_names(net: nn.Module, mode: str) -> frozenset[str]:
    """Return the names (as in ``net.state_dict()``) of the site-local parameters."""
    entry = ADAPTATIONS[mode]
    return module_parameter_names(net, entry.local, entry.pick)


def module_parameter_names(net: nn.Module, selectors: Iterable[Selector],
                           pick: Picker | None = None) -> frozenset[str]:
    """Return the parameter names of the modules ``selectors`` accept or ``pick`` chooses."""
    selectors = tuple(selectors)
    picked = {id(m) for m in pick(net)} if pick is not None else set()
    names: set[str] = set()
    for module_name, module in net.named_modules():
        if id(module) not in picked and not any(select(module) for select in selectors):
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
