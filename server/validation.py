"""Checks of every update before aggregation, and of the server's own step: pure NumPy.

A broken or hostile site can send anything. Before a reply is aggregated its
weights must have exactly the global model's names, shapes and dtypes (floating
point in the run's transfer-dtype), hold only finite values, and move the model
by no more than ``ratio`` times the typical site's update (the lower median of
all norms, so one or two huge updates cannot raise the reference) and no more
than an optional absolute bound. After aggregation, a step that would make the
global model non-finite or grow its norm by more than a factor is refused and
the previous model kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from shared.weights import NDArrays, wire_dtype


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def update_problem(reference: NDArrays, update: NDArrays,
                   transfer: str = "float32") -> str | None:
    """Return why ``update`` cannot be aggregated with ``reference``'s layout, or ``None``.

    ``update`` is as it arrived: its floating-point arrays must have the dtype the
    run's ``transfer`` (run config ``transfer-dtype``) puts on the wire.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        parts = ([f"misses {_names(missing)}"] if missing else []) + (
            [f"has unknown {_names(extra)}"] if extra else [])
        return "parameter names differ from the global model: " + "; ".join(parts)
    for name, ref in reference.items():
        got = update[name]
        if got.shape != ref.shape:
            return f"parameter '{name}' has shape {got.shape}, expected {ref.shape}"
        want = wire_dtype(ref.dtype, transfer)
        if got.dtype != want:
            floating = np.issubdtype(ref.dtype, np.floating)
            because = f" (transfer-dtype {transfer})" if floating else ""
            return f"parameter '{name}' has dtype {got.dtype}, expected {want}{because}"
        if np.issubdtype(got.dtype, np.inexact) and not np.all(np.isfinite(got)):
            return f"parameter '{name}' holds NaN or infinite values"
    return None


def update_norm(reference: NDArrays, update: NDArrays) -> float:
    """Return the L2 norm of ``update - reference`` over every parameter."""
    total = 0.0
    for name, ref in reference.items():
        diff = update[name].astype(np.float64) - ref.astype(np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def norm_outliers(norms: Mapping[str, float], ratio: float,
                  absolute: float = 0.0) -> dict[str, str]:
    """Return the sites whose update norm is out of bounds, with the reason.

    Parameters
    ----------
    norms : Mapping
        Update norm per site.
    ratio : float
        Largest allowed multiple of the reference norm: the lower median of all
        norms (with two sites, the smaller one).
    absolute : float
        Largest allowed norm; 0 for no absolute bound.
    """
    out: dict[str, str] = {}
    values = sorted(norms.values())
    reference = values[(len(values) - 1) // 2] if values else 0.0
    for site, norm in norms.items():
        if absolute > 0 and norm > absolute:
            out[site] = f"update norm {norm:.4g} is above max-update-norm {absolute:g}"
        elif len(values) > 1 and reference > 0 and norm > ratio * reference:
            out[site] = (f"update norm {norm:.4g} is {norm / reference:.1f} times the typical "
                         f"site's {reference:.4g} (limit update-norm-ratio {ratio:g})")
    return out


def step_problem(previous: NDArrays, new: NDArrays, max_growth: float) -> str | None:
    """Return why the server's aggregated model must not replace ``previous``, or ``None``."""
    for name, value in new.items():
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            return f"the aggregated model's parameter '{name}' is not finite"
    before = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in previous.values()))
    after = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in new.values()))
    # An all-zero model (a test's, or a layer-less start) has no scale: measure from 1.
    scale = max(before, 1.0)
    if after > max_growth * scale:
        return (f"the aggregated model's norm would grow {after / scale:.3g} times (limit "
                f"max-model-growth {max_growth:g}); lower server-learning-rate or check the "
                "sites' updates")
    return None
