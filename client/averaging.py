"""An exponential moving average of the trained parameters over a round's local steps.

Under DP-SGD every step adds fresh Gaussian noise to the parameters; averaging the
last iterates cancels part of it at no privacy cost (it is post-processing of the
noisy steps), and the average is what the site sends (De et al., 2022, use it for
evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class ParameterAverage:
    """``avg <- decay * avg + (1 - decay) * p`` after every step, from the first step's values.

    Parameters
    ----------
    params : mapping of str to torch.nn.Parameter
        The parameters the optimiser changes.
    decay : float
        In (0, 1): the weight of the average so far; 1 - decay is the weight of the
        newest iterate.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.params = dict(params)
        self.decay = decay
        self.average: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the parameters' current values into the average."""
        if not self.average:
            # Started at the first iterate, not at the round's start: no bias to correct.
            self.average = {n: p.detach().clone() for n, p in self.params.items()}
            return
        for name, p in self.params.items():
            self.average[name].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        """Overwrite the parameters with the average (no-op before the first update)."""
        for name, value in self.average.items():
            self.params[name].copy_(value)
