"""The run config's ``initial-model``: a starting model the coordinator supplies.

Read once by the ServerApp as the global weights before round 1; sites never read
it, they receive its shared weights in the first train message like any global
model. Two kinds of file are accepted, both read with
``torch.load(weights_only=True)`` so a file cannot run code: a fedseg checkpoint
(a run's ``final_model.pt``, or ``python -m benchmarks.pretrain``'s output) and a
plain PyTorch ``state_dict`` of the same MONAI network (also nested under
``"state_dict"``, as many training scripts save it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from shared import checkpoint
from shared.config import ModelSpec
from shared.errors import ConfigError
from shared.partition import uses_adapter
from shared.settings import RUN_CONFIG, to_keys
from shared.weights import NDArrays, state_to_numpy

KEY = "initial-model"
_KINDS = ("pass a fedseg checkpoint (a run's final_model.pt, or the output of python -m "
          "benchmarks.pretrain) or a file written by torch.save(network.state_dict(), FILE)")
#: What fixes the shapes of a network's parameters, for errors naming what to change.
ARCHITECTURE_KEYS = ("network", "norm", "channels", "in-channels", "num-classes")
_BACKBONE = "backbone."
_ADAPTER = "adapter."


def _fail(path: Path, problem: str, fix: str) -> ConfigError:
    return ConfigError(RUN_CONFIG.name, KEY, f"{path}: {problem}", fix)


def _tensors(payload: object) -> dict[str, torch.Tensor] | None:
    if isinstance(payload, Mapping) and payload and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        return dict(payload)
    return None


def read_file(path: Path) -> tuple[NDArrays, ModelSpec | None]:
    """Return the floating-point weights in ``path`` and, for a fedseg checkpoint, its spec.

    Raises
    ------
    ConfigError
        Missing or unreadable file, or neither kind of model file.
    """
    if not path.is_file():
        raise _fail(path, "file not found" if not path.exists() else "is not a file",
                    f"{_KINDS}; the path is read on the machine running the ServerApp")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or unsafe file
        raise _fail(path, f"cannot be read by torch.load(weights_only=True) "
                    f"({type(exc).__name__})", _KINDS) from None
    spec = None
    if isinstance(payload, Mapping) and payload.get("format") == checkpoint.FORMAT:
        try:
            spec = ModelSpec.from_config(payload["model"])
        except Exception as exc:  # a damaged spec: any parse error
            raise _fail(path, f"is a damaged fedseg checkpoint ({type(exc).__name__})",
                        _KINDS) from None
        payload = payload.get("weights")
    elif isinstance(payload, Mapping) and _tensors(payload.get("state_dict")) is not None:
        payload = payload["state_dict"]
    state = _tensors(payload)
    if state is None:
        raise _fail(path, "holds neither a fedseg checkpoint nor a state_dict of tensors",
                    _KINDS)
    return state_to_numpy(state), spec


def _canonical(weights: NDArrays, adapter: bool) -> NDArrays:
    """Rename to the run's layout: the backbone's names behind an adapter, bare otherwise.

    A file saved from a network with an input adapter (``backbone.*`` plus the
    site-local ``adapter.*``) fits a run without one, and the other way round; the
    adapter itself is per site and starts as the identity.
    """
    bare = {k: v for k, v in weights.items() if not k.startswith(_ADAPTER)}
    if bare and all(k.startswith(_BACKBONE) for k in bare):
        bare = {k[len(_BACKBONE):]: v for k, v in bare.items()}
    return {_BACKBONE + k: v for k, v in bare.items()} if adapter else bare


def _fix(spec: ModelSpec, saved: ModelSpec | None) -> str:
    run = to_keys(spec)
    if saved is not None:
        theirs = to_keys(saved)
        differ = [k for k in ARCHITECTURE_KEYS if run[k] != theirs[k]]
        if differ:
            shown = " ".join(f"{k}={theirs[k]!r}" for k in differ)
            return f"it was saved with {shown}: set that in the run config"
    shown = " ".join(f"{k}={run[k]!r}" for k in ARCHITECTURE_KEYS)
    return (f"the run builds {shown}; set network, channels, in-channels and num-classes "
            "to the saved network's")


def load_initial_model(path: Path, spec: ModelSpec, shared: NDArrays,
                       local: frozenset[str]) -> NDArrays:
    """Return the shared weights of the starting model in ``path``, checked against the run.

    Parameters
    ----------
    path : pathlib.Path
        The run config's ``initial-model``.
    spec : ModelSpec
        The run's model.
    shared : dict of numpy.ndarray
        The run's freshly built shared weights: the names, shapes and dtypes to match.
    local : frozenset of str
        Site-local parameter names of the run (they may be in the file, and are
        ignored: each site starts its own layers from their defaults).

    Raises
    ------
    ConfigError
        One line naming the file and the problem: missing, unreadable, another
        architecture (the first parameter that does not fit and the settings to
        change), or a NaN or infinite weight.
    """
    weights, saved = read_file(path)
    weights = _canonical(weights, uses_adapter(spec.adaptation))
    missing = [k for k in shared if k not in weights]
    extra = [k for k in weights if k not in shared and k not in local]
    if missing or extra:
        first = (f"has no parameter '{missing[0]}'" if missing
                 else f"has parameter '{extra[0]}', which the run's model lacks")
        count = len(missing) + len(extra)
        more = f" ({count - 1} more names differ)" if count > 1 else ""
        raise _fail(path, f"does not fit the run's model: it {first}{more}", _fix(spec, saved))
    out: NDArrays = {}
    for name, reference in shared.items():
        value = weights[name]
        if value.shape != reference.shape:
            raise _fail(path, f"does not fit the run's model: '{name}' has shape "
                        f"{tuple(value.shape)}, the run's model needs {tuple(reference.shape)}",
                        _fix(spec, saved))
        if not np.all(np.isfinite(value)):
            raise _fail(path, f"parameter '{name}' holds NaN or infinite values",
                        "pass a model whose weights are all finite")
        # A float64 or float16 file fits as well: sites train in the network's dtype.
        out[name] = value.astype(reference.dtype, copy=False)
    return out

