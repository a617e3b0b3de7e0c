"""The shared segmentation networks, one registry entry each.

Only normalisation layers without running statistics are used (InstanceNorm,
GroupNorm): Opacus rejects BatchNorm, and BatchNorm's running means would carry
statistics of a site's images inside the shared weights.

A new architecture is one entry of :data:`NETWORKS`: its builder, the factor
every input side must be divisible by, the fewest channel levels it needs and
whether its output layer is normalised (which the GroupNorm group count must
divide).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import BasicUNet, SegResNet, UNet
from torch import nn

from shared.partition import adapt
from shared.registry import Registry

NormArg = tuple[str, dict[str, Any]]


class NetworkSpec(Protocol):
    """What a builder reads of :class:`shared.config.ModelSpec`."""

    @property
    def network(self) -> str: ...  # noqa: D102
    @property
    def norm(self) -> str: ...  # noqa: D102
    @property
    def channels(self) -> tuple[int, ...]: ...  # noqa: D102
    @property
    def in_channels(self) -> int: ...  # noqa: D102
    @property
    def num_classes(self) -> int: ...  # noqa: D102
    @property
    def adaptation(self) -> str: ...  # noqa: D102
    @property
    def spatial_dims(self) -> int: ...  # noqa: D102
    @property
    def norm_groups(self) -> int: ...  # noqa: D102


@dataclass(frozen=True)
class NetworkType:
    """One architecture.

    Attributes
    ----------
    build : callable
        ``(spec, norm) -> nn.Module`` mapping ``(B, in_channels, *patch)`` to logits.
    downsampling : callable
        Number of channel levels -> factor every patch side must be divisible by.
    min_levels : int
        Fewest ``channels`` values the builder needs.
    channels_hint : str
        Shown when ``channels`` has too few values.
    normalises_output : bool
        Its last up-sampling output, ``num_classes`` wide, is normalised too.
    decoder : callable
        ``built network -> modules`` of its up path, output layer included, in
        forward order; ``dp-trainable`` (:mod:`shared.trainable`) trains these alone.
    """

    build: Callable[[NetworkSpec, NormArg], nn.Module]
    downsampling: Callable[[int], int]
    decoder: Callable[[nn.Module], list[nn.Module]]
    min_levels: int = 1
    channels_hint: str = ""
    normalises_output: bool = False


def _unet(spec: NetworkSpec, norm: NormArg) -> nn.Module:
    return UNet(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels,
                out_channels=spec.num_classes, channels=spec.channels,
                strides=(2,) * (len(spec.channels) - 1), num_res_units=1, norm=norm)


def _basicunet(spec: NetworkSpec, norm: NormArg) -> nn.Module:
    return BasicUNet(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels,
                     out_channels=spec.num_classes, features=spec.channels[:6], norm=norm)


def _segresnet(spec: NetworkSpec, norm: NormArg) -> nn.Module:
    return SegResNet(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels,
                     out_channels=spec.num_classes, init_filters=spec.channels[0], norm=norm)


def _unet_decoder(net: nn.Module) -> list[nn.Module]:
    # MONAI's UNet nests Sequential(down, SkipConnection(inner), up) from the outside
    # in; the up paths, innermost first, are its decoder and the outermost ends in
    # the output convolution.
    ups: list[nn.Module] = []
    block = net.get_submodule("model")
    while (isinstance(block, nn.Sequential) and len(block) == 3
           and isinstance(block[1], SkipConnection)):
        ups.insert(0, block[2])
        block = block[1].submodule
    return ups


def _children(net: nn.Module, *names: str) -> list[nn.Module]:
    return [net.get_submodule(name) for name in names]


def _basicunet_decoder(net: nn.Module) -> list[nn.Module]:
    return _children(net, "upcat_4", "upcat_3", "upcat_2", "upcat_1", "final_conv")


def _segresnet_decoder(net: nn.Module) -> list[nn.Module]:
    return _children(net, "up_samples", "up_layers", "conv_final")


NETWORKS: Registry[NetworkType] = Registry("network", {
    "unet": NetworkType(_unet, lambda levels: int(2 ** (levels - 1)), _unet_decoder,
                        min_levels=2,
                        channels_hint="needs at least two levels, e.g. '16,32,64'",
                        normalises_output=True),
    "basicunet": NetworkType(_basicunet, lambda levels: 16, _basicunet_decoder, min_levels=6,
                             channels_hint="needs six values, e.g. '16,16,32,64,128,16'"),
    "segresnet": NetworkType(_segresnet, lambda levels: 8, _segresnet_decoder),
})

NORMS: Registry[Callable[[NetworkSpec], NormArg]] = Registry("norm", {
    "instance": lambda spec: ("instance", {"affine": True}),
    "group": lambda spec: ("group", {"num_groups": spec.norm_groups}),
})

FORBIDDEN_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
)


def build_network(spec: NetworkSpec) -> nn.Module:
    """Return a freshly initialised network for ``spec``.

    Parameters
    ----------
    spec : ModelSpec
        Architecture, normalisation, channels, classes and dimensionality.

    Returns
    -------
    torch.nn.Module
        A MONAI network mapping ``(B, in_channels, *patch)`` to
        ``(B, num_classes, *patch)`` logits, with the site-local modules of
        ``spec.adaptation``.
    """
    net = NETWORKS[spec.network].build(spec, NORMS[spec.norm](spec))
    net = adapt(net, spec.adaptation, spec.in_channels, spec.spatial_dims)
    assert_no_batchnorm(net)
    return net


def assert_no_batchnorm(net: nn.Module) -> None:
    """Raise ``ValueError`` if ``net`` contains a BatchNorm layer."""
    for name, module in net.named_modules():
        if isinstance(module, FORBIDDEN_NORMS):
            raise ValueError(
                f"layer '{name}' is {type(module).__name__}: fedseg networks must use "
                "InstanceNorm or GroupNorm (Opacus rejects BatchNorm)"
            )


def seed_everything(seed: int) -> None:
    """Seed PyTorch's global generator (initial weights are then reproducible)."""
    torch.manual_seed(seed)
