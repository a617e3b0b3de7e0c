"""FedProx's proximal term (Li et al., 2020), on tensors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def proximal_term(
    params: Iterable[tuple[str, torch.Tensor]], anchor: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Return ``sum ||w - w_global||^2`` over the parameters that have an anchor.

    Parameters
    ----------
    params : iterable of (name, tensor)
        The local model's named parameters (with gradients).
    anchor : Mapping[str, torch.Tensor]
        The global weights this round started from, on the same device.

    Returns
    -------
    torch.Tensor
        A scalar; multiply by ``mu / 2`` and add to the loss.
    """
    total: torch.Tensor | None = None
    for name, p in params:
        ref = anchor.get(name)
        if ref is None:
            continue
        term = torch.sum((p - ref) ** 2)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total
