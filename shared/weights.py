"""Convert model weights between PyTorch state dicts and Flower records, by name.

Only floating-point tensors are exchanged: integer buffers (step counters) carry
no learnt information and cannot be averaged. Names are checked on the way in, so
a site never loads weights from a different architecture silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    # Imported where used: `fedseg predict` and `fedseg export` convert weights without
    # ever building a Flower message, and need not load Flower.
    from flwr.app import ArrayRecord

NDArrays = dict[str, np.ndarray]


def state_to_numpy(state: Mapping[str, torch.Tensor]) -> NDArrays:
    """Return the floating-point entries of ``state`` as NumPy arrays (CPU copies)."""
    return {
        name: tensor.detach().cpu().numpy().copy()
        for name, tensor in state.items()
        if tensor.is_floating_point()
    }


def numpy_to_state(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Return ``arrays`` as CPU tensors keyed by the same names."""
    return {name: torch.from_numpy(np.array(a, copy=True)) for name, a in arrays.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack named arrays into an ``ArrayRecord`` (order preserved)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def from_record(record: ArrayRecord) -> NDArrays:
    """Unpack an ``ArrayRecord`` into named NumPy arrays."""
    return {name: arr.numpy() for name, arr in record.items()}


def check_compatible(expected: Mapping[str, torch.Tensor], arrays: Mapping[str, np.ndarray],
                     what: str) -> None:
    """Raise ``ValueError`` unless ``arrays`` has exactly the float names and shapes expected.

    Parameters
    ----------
    expected : Mapping[str, torch.Tensor]
        The receiving model's state dict.
    arrays : Mapping[str, numpy.ndarray]
        Incoming weights.
    what : str
        Where the weights come from, for the error message.
    """
    want = {n: tuple(t.shape) for n, t in expected.items() if t.is_floating_point()}
    got = {n: tuple(a.shape) for n, a in arrays.items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(
            f"{what} does not match this model: missing {missing[:3]}, unexpected {extra[:3]}; "
            "the server and every site must use the same model settings"
        )
    for name, shape in want.items():
        if got[name] != shape:
            raise ValueError(
                f"{what}: '{name}' has shape {got[name]}, this model expects {shape}; "
                "the server and every site must use the same model settings"
            )
