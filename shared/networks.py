"""Build the shared segmentation network from a :class:`~shared.config.ModelSpec`.

Only normalisation layers without running statistics are used (InstanceNorm,
GroupNorm): Opacus rejects BatchNorm, and BatchNorm's running means would carry
statistics of a site's images inside the shared weights.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet, SegResNet, UNet
from torch import nn

from shared.config import ModelSpec
from shared.partition import uses_adapter


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

FORBIDDEN_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
)


def _norm_arg(spec: ModelSpec) -> tuple[str, dict[str, object]]:
    if spec.norm == "group":
        return ("group", {"num_groups": spec.norm_groups})
    return ("instance", {"affine": True})


def build_network(spec: ModelSpec) -> nn.Module:
    """Return a freshly initialised network for ``spec``.

    Parameters
    ----------
    spec : ModelSpec
        Architecture, normalisation, channels, classes and dimensionality.

    Returns
    -------
    torch.nn.Module
        A MONAI network mapping ``(B, in_channels, *patch)`` to
        ``(B, num_classes, *patch)`` logits.
    """
    norm = _norm_arg(spec)
    net: nn.Module
    if spec.network == "unet":
        net = UNet(
            spatial_dims=spec.spatial_dims,
            in_channels=spec.in_channels,
            out_channels=spec.num_classes,
            channels=spec.channels,
            strides=(2,) * (len(spec.channels) - 1),
            num_res_units=1,
            norm=norm,
        )
    elif spec.network == "basicunet":
        net = BasicUNet(
            spatial_dims=spec.spatial_dims,
            in_channels=spec.in_channels,
            out_channels=spec.num_classes,
            features=spec.channels[:6],
            norm=norm,
        )
    else:
        net = SegResNet(
            spatial_dims=spec.spatial_dims,
            in_channels=spec.in_channels,
            out_channels=spec.num_classes,
            init_filters=spec.channels[0],
            norm=norm,
        )
    if uses_adapter(spec.adaptation):
        net = AdaptedNetwork(InputAdapter(spec.in_channels, spec.spatial_dims), net)
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
