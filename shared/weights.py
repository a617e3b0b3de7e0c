"""Convert model weights between PyTorch state dicts and Flower records, by name.

Only floating-point tensors are exchanged: integer buffers (step counters) carry
no learnt information and cannot be averaged. Names are checked on the way in, so
a site never loads weights from a different architecture silently.

The run config's ``transfer-dtype`` chooses the precision of the shared weights
*in messages* (:data:`TRANSFER_DTYPES`): ``float16`` halves every message's
payload. It is a wire format only: both sides convert to float32 before use
(:func:`for_wire` on the way out, :func:`as_dtypes` / :func:`as_float32` on the
way in), so training, aggregation and the server's checkpoints stay float32.
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

from shared.registry import Registry

NDArrays = dict[str, np.ndarray]

#: Precision of the shared weights in messages: the dtype every floating-point array
#: is sent as, or ``None`` to send the weights as held (float32). Integer and boolean
#: arrays always keep their own dtype.
TRANSFER_DTYPES: Registry[np.dtype | None] = Registry("transfer dtype", {
    "float32": None,
    "float16": np.dtype(np.float16),
})


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


def wire_dtype(dtype: np.dtype, transfer: str) -> np.dtype:
    """Return the dtype an array of ``dtype`` has in a message under ``transfer``."""
    half = TRANSFER_DTYPES[transfer]
    return half if half is not None and np.issubdtype(dtype, np.floating) else dtype


def for_wire(arrays: Mapping[str, np.ndarray], transfer: str) -> NDArrays:
    """Return ``arrays`` as they travel under ``transfer`` (floating point cast, others as is)."""
    return {name: a.astype(wire_dtype(a.dtype, transfer), copy=False)
            for name, a in arrays.items()}


def as_dtypes(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
              ) -> NDArrays:
    """Return ``arrays`` in the dtypes of ``reference``'s arrays of the same name."""
    return {name: a.astype(reference[name].dtype, copy=False) for name, a in arrays.items()}


def as_float32(arrays: Mapping[str, np.ndarray]) -> NDArrays:
    """Return ``arrays`` with every floating-point array as float32 (others as they are)."""
    return {name: a.astype(np.float32, copy=False) if np.issubdtype(a.dtype, np.floating)
            else a for name, a in arrays.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Return the bytes of the arrays in ``record`` (the sum of their ``nbytes``)."""
    return sum(array.numpy().nbytes for array in record.values())


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
