"""Which parameters the sites train and send: the ``dp-trainable`` groups.

Fine-tuning a starting model under DP-SGD loses less to noise when fewer
parameters move: the Gaussian noise is added to every trained coordinate, so its
norm grows with the square root of their number, while each case's clipped
gradient does not grow at all. Each entry of :data:`TRAINABLE` chooses modules
by type or by their place in the architecture (the decoder of each network is
declared with it in :data:`shared.networks.NETWORKS`), never by substrings of
parameter names. Parameters outside the group keep requires_grad off at the
site, stay bit-identical through a round and never leave it; the server keeps
their global values (:func:`merge_trainable`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import nn

from shared.networks import NETWORKS, NetworkSpec, build_network
from shared.partition import LOCAL_NORM_TYPES, AdaptedNetwork, InputAdapter, local_parameter_names
from shared.registry import Registry

T = TypeVar("T")

Select = Callable[[nn.Module, str], Iterable[nn.Module]]
"""``(built network, network name) -> modules`` whose parameters train."""


def _backbone(net: nn.Module) -> nn.Module:
    return net.backbone if isinstance(net, AdaptedNetwork) else net


def _norms_and_adapters(net: nn.Module, network: str) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (*LOCAL_NORM_TYPES, InputAdapter))]


def _decoder(net: nn.Module, network: str) -> list[nn.Module]:
    return NETWORKS[network].decoder(_backbone(net))


def _head(net: nn.Module, network: str) -> list[nn.Module]:
    # The last convolution of the decoder writes the class logits.
    convs: list[nn.Module] = [m for part in _decoder(net, network) for m in part.modules()
                              if isinstance(m, nn.modules.conv._ConvNd)]
    return convs[-1:]


@dataclass(frozen=True)
class TrainableGroup:
    """One choice of the parameters sites train.

    Attributes
    ----------
    doc : str
        What trains, for the README.
    select : callable or None
        The modules whose parameters train; ``None``: every parameter.
    """

    doc: str
    select: Select | None = None


TRAINABLE: Registry[TrainableGroup] = Registry("dp-trainable group", {
    "all": TrainableGroup("every parameter"),
    "norm+adapter": TrainableGroup(
        "affine parameters of every InstanceNorm/GroupNorm, and the input adapter when "
        "`adaptation` has one", _norms_and_adapters),
    "decoder": TrainableGroup("the up path and the output layer (MONAI UNet: every "
                              "up-sampling block; BasicUNet: upcat_* and final_conv; "
                              "SegResNet: up_samples, up_layers, conv_final)", _decoder),
    "head": TrainableGroup("the last convolution, which writes the class logits", _head),
})


def trainable_names(net: nn.Module, network: str, mode: str) -> frozenset[str]:
    """Return the names (as in ``net.state_dict()``) of the parameters ``mode`` trains.

    Parameters
    ----------
    net : torch.nn.Module
        A network from :func:`shared.networks.build_network`, adaptation included.
    network : str
        Its :data:`shared.networks.NETWORKS` name, which knows its decoder.
    mode : str
        A :data:`TRAINABLE` name.
    """
    select = TRAINABLE[mode].select
    if select is None:
        return frozenset(name for name, _ in net.named_parameters())
    chosen = {id(m) for m in select(net, network)}
    names: set[str] = set()
    for module_name, module in net.named_modules():
        if id(module) in chosen:
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + name for name, _ in module.named_parameters())
    return frozenset(names)


class TrainableSpec(NetworkSpec, Protocol):
    """A hashable :class:`shared.config.ModelSpec`."""

    def __hash__(self) -> int: ...


@functools.lru_cache(maxsize=16)
def shared_trainable_names(spec: TrainableSpec, mode: str) -> frozenset[str]:
    """Return the parameters a site trains *and* sends: ``mode``'s group minus site-local ones.

    The server's expected reply layout. The network is built under a forked random
    generator, so asking does not change the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        net = build_network(spec)
    local = local_parameter_names(net, spec.adaptation)
    floats = {name for name, t in net.state_dict().items() if t.is_floating_point()}
    return frozenset((floats - local) & trainable_names(net, spec.network, mode))


def merge_trainable(base: Mapping[str, T], update: Mapping[str, T],
                    names: Iterable[str]) -> dict[str, T]:
    """Return ``base`` with the entries ``names`` taken from ``update``, in ``base``'s order.

    A site's reply (only its trained parameters) becomes a full model this way, and
    after aggregation the frozen parameters get back their exact global values.
    """
    chosen = frozenset(names)
    return {k: update[k] if k in chosen else v for k, v in base.items()}
