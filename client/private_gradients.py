"""DP-SGD's per-unit gradients, and Opacus's optimiser that clips, noises and counts them.

A DP batch is ``(B, K, C, *patch)``: B Poisson-sampled units (patients), each
with K augmented patches of its own cases. A unit's gradient is the gradient of
the mean loss over its K patches (augmentation multiplicity, De et al. 2022):
the average is taken *before* clipping, so K improves the gradient at no privacy
cost, since the unit's influence is still bounded by the clipping norm.

Each grad-sample mode (:data:`GRAD_SAMPLE_MODES`) writes those B gradients into
``p.grad_sample`` of every trainable parameter; Opacus's ``DPOptimizer`` then
clips each to the clipping norm, sums them, adds Gaussian noise, divides by the
expected batch size and tells the accountant about the step. Parameters with
``requires_grad=False`` get no gradient and are not in the optimiser.

Only sites import this module; it loads Opacus when a DP round starts, so the
node config can name the modes without loading it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.registry import Registry

# PyTorch is imported where gradients are computed: the node config names this
# registry, and `fedseg site check` / `fedseg plan` read the node config without it.
if TYPE_CHECKING:
    import torch
    from opacus.accountants.accountant import IAccountant
    from opacus.optimizers import DPOptimizer
    from torch import nn

Precision = Callable[[], AbstractContextManager[Any]]
UnitGradients = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""``(images (B, K, C, *patch), labels (B, K, 1, *patch)) -> (B,)`` unit losses; sets
``p.grad_sample`` of shape ``(B, *p.shape)`` on every trainable parameter."""


def trainable(net: nn.Module) -> dict[str, nn.Parameter]:
    """Return the parameters that train (``requires_grad``), by name."""
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


def grad_sample(p: nn.Parameter) -> torch.Tensor:
    """Return ``p.grad_sample``, the attribute Opacus reads per-sample gradients from."""
    value: torch.Tensor = getattr(p, "grad_sample")  # noqa: B009 - set at run time
    return value


def set_grad_sample(p: nn.Parameter, value: torch.Tensor | None) -> None:
    """Set ``p.grad_sample`` for Opacus's ``DPOptimizer``."""
    setattr(p, "grad_sample", value)  # noqa: B010 - Opacus's run-time attribute


def _empty(params: dict[str, nn.Parameter]) -> torch.Tensor:
    import torch

    # An empty Poisson batch: no unit contributes, but the step (noise only) still
    # happens, as the accountant assumes; Opacus clips a zero-length grad_sample.
    for p in params.values():
        set_grad_sample(p, torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device))
    return torch.zeros(0)


def _vmap(net: nn.Module, precision: Precision) -> UnitGradients:
    """torch.func: ``vmap`` of ``grad`` of each unit's mean loss over the units."""
    from torch.func import functional_call, grad_and_value, vmap

    from client.losses import patch_losses

    params = trainable(net)

    def unit_loss(weights: dict[str, torch.Tensor], images: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
        with precision():
            logits = functional_call(net, weights, (images,))
        return patch_losses(logits.float(), labels).mean()

    # "different": a layer with dropout draws its own mask per unit, as in a plain batch.
    per_unit = vmap(grad_and_value(unit_loss), in_dims=(None, 0, 0), randomness="different")

    def compute(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 0:
            return _empty(params)
        grads, losses = per_unit({n: p.detach() for n, p in params.items()}, images, labels)
        for name, p in params.items():
            set_grad_sample(p, grads[name])
        return losses.detach()

    return compute


@contextmanager
def expected_hook_warning() -> Iterator[None]:
    """Silence PyTorch's one expected warning about Opacus's backward hooks."""
    # The network's input never requires a gradient, so PyTorch warns on every step
    # that Opacus's full backward hook on the first layer fires for outputs only.
    # That is how Opacus works; its other warnings (unsupported layers) stay visible.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning,
                                message="Full backward hook is firing when gradients")
        yield


def _opacus(mode: str) -> Callable[[nn.Module, Precision], UnitGradients]:
    """Opacus's own per-sample gradients of the B*K patches, summed per unit."""

    def build(net: nn.Module, precision: Precision) -> UnitGradients:
        from opacus.grad_sample.utils import wrap_model

        from client.losses import patch_losses

        params = trainable(net)
        # Summed loss: Opacus leaves each patch's gradient unscaled.
        model = wrap_model(net, mode, loss_reduction="sum")

        def compute(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            units, draws = images.shape[:2]
            if units == 0:
                return _empty(params)
            with expected_hook_warning():
                with precision():
                    logits = model(images.flatten(0, 1))
                losses = patch_losses(logits.float(), labels.flatten(0, 1))
                # Each patch weighs 1/K: a unit's K rows then sum to its mean loss's gradient.
                (losses.sum() / draws).backward()
            for p in params.values():
                set_grad_sample(p, grad_sample(p).view(units, draws, *p.shape).sum(1))
            return losses.detach().view(units, draws).mean(1)

        return compute

    return build


GRAD_SAMPLE_MODES: Registry[Callable[[nn.Module, Precision], UnitGradients]] = Registry(
    "dp-grad-sample-mode", {
        "vmap": _vmap,
        "hooks": _opacus("hooks"),
        "functorch": _opacus("functorch"),
        "ew": _opacus("ew"),
    })
"""Ways to compute per-unit gradients. ``vmap`` (the default) was the fastest on the
default 2D U-Net (``python -m benchmarks.privacy``); Opacus's ``ghost`` clipping is not
offered: it only knows per-patch norms, not the norm of a unit's averaged gradient."""


@dataclass
class PrivateStep:
    """Opacus's ``DPOptimizer`` around the site's optimiser, with its accountant.

    Attributes
    ----------
    optimiser : DPOptimizer
        Clips each unit's gradient, sums, adds noise, divides by the expected
        number of units; its ``pre_step`` leaves the private gradient in ``p.grad``.
    accountant : IAccountant
        Opacus's accountant, told about every step the optimiser takes.
    """

    optimiser: DPOptimizer
    accountant: IAccountant

    @classmethod
    def wrap(cls, optimiser: torch.optim.Optimizer, *, noise_multiplier: float,
             max_grad_norm: float, expected_units: float, sample_rate: float,
             accountant: str) -> PrivateStep:
        """Wrap ``optimiser`` for DP-SGD at ``sample_rate`` over the units."""
        from opacus.accountants import create_accountant
        from opacus.optimizers import DPOptimizer

        dp = DPOptimizer(optimiser, noise_multiplier=noise_multiplier,
                         max_grad_norm=max_grad_norm, expected_batch_size=expected_units,
                         loss_reduction="mean")
        counter = create_accountant(accountant)
        dp.attach_step_hook(counter.get_optimizer_hook_fn(sample_rate=sample_rate))
        return cls(dp, counter)

    def steps(self) -> int:
        """Return the number of steps the accountant was told about."""
        return sum(int(k) for _, _, k in self.accountant.history)
