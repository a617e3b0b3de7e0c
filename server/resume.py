"""Continuing a run after the coordinator stopped: the resume state and its checks.

Flower 1.41 marks a run FAILED when the SuperLink restarts, and nothing in Flower
continues it. So after every round the ServerApp writes ``resume-state.pt`` into
the run folder, atomically and after the round's checkpoint and metrics: the
round number, the global weights, the strategy's own state (FedAdam's moments),
the metrics history, the parsed run config (planned values included) and the
server's random generators. A new Flower run whose run config says
``resume-from = "<run folder>"`` reads it and continues at the next round, in the
same folder, with the saved settings; it never plans again.

Nothing else needs saving: sites are stateless between rounds except for their
local layers and privacy ledger, which they keep on their own disks, and each
round's local training is seeded from (seed, site seed, round), so a resumed
round N trains exactly as it would have.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from server.config import RunConfig
from server.history import MetricsHistory
from shared import settings
from shared.atomic import write_atomic
from shared.errors import FedsegError
from shared.run_files import RunFiles
from shared.weights import NDArrays, numpy_to_state, state_to_numpy

FORMAT = "fedseg-resume/1"
KEY = "resume-from"
#: The one saved setting a resumed run may change: raising it extends the run.
EXTENDABLE = "num-server-rounds"
#: Keys that say where to read and write, not what to train; never compared.
FREE_KEYS = frozenset({KEY, "output-dir"})

#: Flower strategies keep their optimiser state in attributes. Each stateful base
#: class names its attributes here once; FedAdam, FedYogi and FedAdagrad inherit
#: FedOpt's. A strategy not listed (FedAvg, FedProx) has no state to carry.
STATEFUL: tuple[tuple[type, tuple[str, ...]], ...] = (
    (FedOpt, ("current_arrays", "m_t", "v_t")),
)

StrategyState = dict[str, NDArrays]

_FRESH = "leave resume-from empty to start a fresh run"


class ResumeError(FedsegError):
    """A run cannot be continued from the folder ``resume-from`` names."""

    def __init__(self, run_dir: Path, problem: str, fix: str, where: str = KEY) -> None:
        super().__init__(f"{where} {run_dir}: {problem}; {fix}")


def _base(strategy: Strategy) -> Strategy:
    # The central-DP wrappers hold the aggregating strategy in ``strategy``.
    inner = getattr(strategy, "strategy", None)
    return _base(inner) if isinstance(inner, Strategy) else strategy


def strategy_state(strategy: Strategy) -> StrategyState:
    """Return copies of the arrays ``strategy`` carries from round to round."""
    base = _base(strategy)
    state: StrategyState = {}
    for cls, attrs in STATEFUL:
        if isinstance(base, cls):
            for attr in attrs:
                arrays = getattr(base, attr)
                if arrays:
                    state[attr] = {k: np.array(v, copy=True) for k, v in arrays.items()}
    return state


def restore_strategy(strategy: Strategy, state: StrategyState) -> None:
    """Give ``strategy`` back the arrays :func:`strategy_state` took (absent: ``None``)."""
    base = _base(strategy)
    for cls, attrs in STATEFUL:
        if isinstance(base, cls):
            for attr in attrs:
                saved = state.get(attr)
                setattr(base, attr, None if saved is None
                        else {k: np.array(v, copy=True) for k, v in saved.items()})


def capture_rng() -> dict[str, Any]:
    """Return the server's global random generators' states, as ``torch.load`` may read them.

    Python's ``random`` orders the sampled sites (Flower's ``sample_nodes``), NumPy's
    draws the central-DP noise, and PyTorch's seeded the initial weights.
    """
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
    }


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Set the generators :func:`capture_rng` saved."""
    py, npy = rng["python"], rng["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
        "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    torch.set_rng_state(rng["torch"])


def _fedseg_version() -> str:
    try:
        return metadata.version("fedseg")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class ResumeState:
    """Everything a run needs to continue after ``server_round``.

    Attributes
    ----------
    server_round : int
        The last finished round.
    weights : dict of str to numpy.ndarray
        The global weights after it.
    strategy : dict of str to NDArrays
        The strategy's state (:func:`strategy_state`); empty for FedAvg and FedProx.
    history : MetricsHistory
        Every finished round, each once.
    run_config : dict
        The parsed run config as flat keys (planned values included).
    rng : dict
        The server's random generators (:func:`capture_rng`).
    """

    server_round: int
    weights: NDArrays
    strategy: StrategyState
    history: MetricsHistory
    run_config: dict[str, Any]
    rng: dict[str, Any]

    @classmethod
    def capture(cls, server_round: int, weights: NDArrays, history: MetricsHistory,
                config: RunConfig, strategy: Strategy) -> ResumeState:
        """Return the state of a run right after ``server_round``."""
        return cls(server_round, weights, strategy_state(strategy), history,
                   settings.to_keys(config), capture_rng())

    def restore(self, strategy: Strategy) -> None:
        """Put the strategy's state and the random generators back as they were saved."""
        restore_strategy(strategy, self.strategy)
        restore_rng(self.rng)

    def save(self, path: Path) -> None:
        """Write the state atomically (loadable with ``torch.load(weights_only=True)``)."""
        payload: dict[str, Any] = {
            "format": FORMAT,
            "fedseg-version": _fedseg_version(),
            "round": self.server_round,
            "weights": numpy_to_state(self.weights),
            "strategy": {attr: numpy_to_state(arrays) for attr, arrays in self.strategy.items()},
            "history": self.history.to_json(),
            "run-config": self.run_config,
            "rng": self.rng,
        }
        write_atomic(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, run_dir: Path) -> ResumeState:
        """Read the state of the run folder ``run_dir``, refusing anything unusable."""
        path = RunFiles(run_dir).resume_state
        if not run_dir.is_dir():
            raise ResumeError(run_dir, "run folder not found",
                              "pass the folder of the run to continue, e.g. runs/run-<run id>")
        if not path.is_file():
            raise ResumeError(run_dir, f"has no {path.name}, so no round of it finished (or it "
                              "is not a fedseg run folder)", _FRESH)
        damaged = (f"{path.name} is damaged", "it is written atomically, so it was changed "
                   f"after the run; restore it from a backup or {_FRESH}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise ResumeError(run_dir, f"{damaged[0]} ({type(exc).__name__})",
                              damaged[1]) from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else None
            raise ResumeError(run_dir, f"{path.name} has format {found!r}, not {FORMAT!r}",
                              "resume it with the fedseg version that wrote it")
        try:
            return cls(
                server_round=int(payload["round"]),
                weights=state_to_numpy(payload["weights"]),
                strategy={attr: state_to_numpy(arrays)
                          for attr, arrays in payload["strategy"].items()},
                history=MetricsHistory.from_json(payload["history"]),
                run_config=dict(payload["run-config"]),
                rng=payload["rng"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResumeError(run_dir, f"{damaged[0]} ({type(exc).__name__}: {exc})",
                              damaged[1]) from None


@dataclass(frozen=True)
class ResumePoint:
    """A run to continue: its folder, its saved settings and its state."""

    run_dir: Path
    config: RunConfig
    state: ResumeState


def requested(values: Mapping[str, Any]) -> Path | None:
    """Return the run folder ``values`` asks to resume, or ``None`` for a fresh run."""
    raw = str(values.get(KEY, "")).strip()
    return Path(raw).expanduser() if raw else None


def _set_explicitly(values: Mapping[str, Any]) -> dict[str, Any]:
    """Return the keys of ``values`` that try to set something.

    Flower merges ``pyproject.toml``'s defaults into every run config, so a key at
    its declared default cannot be told from one left out; it counts as not set,
    as does a planned key at ``auto``. The saved value holds for both.
    """
    defaults = settings.toml_defaults(RunConfig)
    auto = settings.unplanned(RunConfig, values)
    return {k: v for k, v in values.items()
            if k not in FREE_KEYS and k not in auto and not (k in defaults and v == defaults[k])}


def resumed_config(run_dir: Path, saved: Mapping[str, Any],
                   values: Mapping[str, Any]) -> RunConfig:
    """Return the saved run config, with ``num-server-rounds`` taken from ``values``.

    Raises
    ------
    ResumeError
        ``values`` sets another key to something other than its saved value.
    """
    explicit = _set_explicitly(values)
    # Parsed, so "FedAdam" and "fedadam" or 8 and 8.0 compare equal; a bad value or
    # an unknown key gets the usual run-config error.
    wanted = settings.to_keys(RunConfig.from_user_config({**saved, **explicit}))
    # A key added since the run started has its default there.
    before = settings.to_keys(RunConfig.from_user_config(saved))
    changed = [k for k in sorted(explicit) if k != EXTENDABLE and wanted[k] != before[k]]
    if changed:
        shown = ", ".join(f"{k} {before[k]!r} -> {wanted[k]!r}" for k in changed)
        raise ResumeError(run_dir, f"the run config changes {shown}, but a resumed run keeps "
                          "the settings it started with", "remove those keys from the run "
                          "config (only num-server-rounds may change, to extend the run)")
    return RunConfig.from_user_config({**saved, EXTENDABLE: wanted[EXTENDABLE], KEY: str(run_dir)})


def resume_point(values: Mapping[str, Any]) -> ResumePoint | None:
    """Return where to continue the run ``values`` names in ``resume-from`` (``None``: fresh).

    Raises
    ------
    ResumeError
        The folder or its state file is missing or damaged, the run config changes a
        saved setting, or the run already has all of its rounds.
    """
    run_dir = requested(values)
    return None if run_dir is None else resume_at(run_dir, values)


def resume_at(run_dir: Path, values: Mapping[str, Any]) -> ResumePoint:
    """Return where to continue the run in ``run_dir``, given the new run config ``values``.

    Raises
    ------
    ResumeError
        As :func:`resume_point`.
    """
    state = ResumeState.load(run_dir)
    config = resumed_config(run_dir, state.run_config, values)
    if state.server_round >= config.num_server_rounds:
        raise ResumeError(run_dir, f"the run already finished {state.server_round} rounds "
                          f"(num-server-rounds {config.num_server_rounds})",
                          f"set num-server-rounds above {state.server_round} to extend it, "
                          f"or {_FRESH}")
    return ResumePoint(run_dir, config, state)
