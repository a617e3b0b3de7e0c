"""The site's privacy ledger: every DP-SGD step it ever took, kept on its own disk.

Saved atomically after every round and read at start, so a daemon restart or a
new run continues the same cumulative epsilon instead of starting from zero.

The ledger is read strictly: any file or entry that is not exactly what
:meth:`PrivacyLedger.save` writes stops the site with one "damaged ledger" error.
Skipping a bad entry, or starting afresh, would under-report the privacy already
spent, so nothing is ever dropped or reset.

A round holds an exclusive lock (:meth:`PrivacyLedger.locked`) from reading the
ledger to recording its own steps, so two rounds at once cannot both start from
the old spending and lose one round's steps.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.accounting import compute_epsilon
from shared.atomic import write_text_atomic
from shared.errors import DataError
from shared.privacy import Mechanism, Step

FORMAT = "fedseg-privacy-ledger/1"
FILE_NAME = "privacy-ledger.json"
LOCK_NAME = ".privacy-ledger.lock"
LOCK_TIMEOUT_S = 600.0

_KEYS = ("format", "history", "rounds", "calibrated_noise")
_ROUND_KEYS = ("round", "noise_multiplier", "sample_rate", "steps", "epsilon")
_RESTORE = ("restore it from the site's backup; never delete it: without it the site's "
            "epsilon would start again from zero")


class LedgerFormatError(ValueError):
    """One problem found in a ledger's content, worded for :class:`DataError`."""


@dataclass
class PrivacyLedger:
    """Cumulative DP-SGD history of one site."""

    path: Path
    history: list[Step] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    calibrated_noise: float | None = None

    @classmethod
    def load(cls, state_dir: Path) -> PrivacyLedger:
        """Read the ledger in ``state_dir`` (an empty one if the site never trained with DP).

        Raises
        ------
        DataError
            "damaged ledger": the path is not a readable file, or its content is not a
            ledger exactly as :meth:`save` writes it (see :func:`parse_ledger`).
        """
        path = state_dir / FILE_NAME
        if not os.path.lexists(path):
            return cls(path)
        if not path.exists():
            raise _damaged(path, "is a symbolic link to a missing file")
        if not path.is_file():
            raise _damaged(path, "is a directory, not a file" if path.is_dir()
                           else "is not a regular file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise _damaged(path, "is not UTF-8 text") from None
        except OSError as exc:
            raise DataError(path, f"damaged ledger: cannot be read ({exc.strerror or exc})",
                            "give the site's user read and write access, or "
                            + _RESTORE) from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _damaged(path, f"not valid JSON ({exc.msg} at line {exc.lineno} "
                                 f"column {exc.colno})") from None
        try:
            history, rounds, noise = parse_ledger(raw)
        except LedgerFormatError as exc:
            raise _damaged(path, str(exc)) from None
        return cls(path, history, rounds, noise)

    @classmethod
    @contextmanager
    def locked(cls, state_dir: Path, timeout: float = LOCK_TIMEOUT_S,
               poll: float = 0.05) -> Iterator[PrivacyLedger]:
        """Hold the site's ledger lock, load the ledger under it, and yield it.

        Everything from reading the spent epsilon to :meth:`record` must happen inside
        the ``with`` block: a second round, in this process or another, waits here
        until the first has saved its steps.

        Parameters
        ----------
        state_dir : Path
            The site's state folder; created if needed (the lock file lives there).
        timeout : float
            Seconds to wait for another round to release the lock.
        poll : float
            Seconds between attempts while waiting.

        Raises
        ------
        DataError
            The lock was not free within ``timeout``, or the ledger is damaged.
        """
        state_dir.mkdir(parents=True, exist_ok=True)
        # A sidecar file, not the ledger: save() replaces the ledger by rename, so a
        # lock on the ledger's inode would no longer guard the path once it is saved.
        # The sidecar is never deleted, since a waiter may already have it open.
        lock_path = state_dir / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _acquire(fd, lock_path, timeout, poll)
            yield cls.load(state_dir)
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def epsilon(self, delta: float, mechanism: Mechanism, extra: Step | None = None) -> float:
        """Return the epsilon spent so far, plus ``extra`` if given (a projection)."""
        steps = self.history + ([extra] if extra else [])
        return compute_epsilon(steps, delta, mechanism)

    def record(self, step: Step, server_round: int, epsilon: float) -> None:
        """Append one round's steps and write the ledger atomically."""
        self.history.append(step)
        self.rounds.append({"round": server_round, "noise_multiplier": step[0],
                            "sample_rate": step[1], "steps": step[2], "epsilon": epsilon})
        self.save()

    def save(self) -> None:
        """Write the ledger atomically."""
        write_text_atomic(self.path, json.dumps({
            "format": FORMAT,
            "history": [list(s) for s in self.history],
            "rounds": self.rounds,
            "calibrated_noise": self.calibrated_noise,
        }, indent=2))


def _acquire(fd: int, lock_path: Path, timeout: float, poll: float) -> None:
    # flock, not fcntl/lockf record locks: flock belongs to the open file
    # description, so two threads of one process, each with its own open(), also
    # exclude each other, while POSIX record locks are per process and would not.
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            # Polling instead of a blocking flock, so a stuck round gives an error
            # line after the timeout instead of hanging the site for ever.
            if time.monotonic() >= deadline:
                raise DataError(
                    lock_path, f"privacy ledger still locked by another round after "
                    f"{timeout:g} s", "wait for that round to finish, or stop the other "
                    "process that uses this state-dir (one SuperNode per state-dir)") from None
            time.sleep(poll)


def _damaged(path: Path, problem: str) -> DataError:
    return DataError(path, f"damaged ledger: {problem}", _RESTORE)


def parse_ledger(raw: object) -> tuple[list[Step], list[dict[str, Any]], float | None]:
    """Validate a decoded ledger and return its history, rounds and calibrated noise.

    Accepts exactly what :meth:`PrivacyLedger.save` writes: an object with the
    format tag and no other keys than it writes; history entries ``[noise, rate,
    steps]`` with finite noise at least 0, rate in (0, 1] and whole steps at least 0;
    one ``rounds`` entry per history entry, agreeing with it; and a calibrated noise
    that is ``null`` or finite and greater than 0.

    Raises
    ------
    LedgerFormatError
        The first problem found, in words.
    """
    if not isinstance(raw, dict):
        raise LedgerFormatError(f"the top level is {_kind(raw)}, not a JSON object")
    if "format" not in raw:
        raise LedgerFormatError(f"no 'format' key (expected '{FORMAT}')")
    if raw["format"] != FORMAT:
        raise LedgerFormatError(f"format is {raw['format']!r}, expected '{FORMAT}'")
    missing = [k for k in _KEYS if k not in raw]
    if missing:
        raise LedgerFormatError(f"no '{missing[0]}' key")
    unknown = sorted(str(k) for k in raw if k not in _KEYS)
    if unknown:
        raise LedgerFormatError(f"unexpected key '{unknown[0]}'")
    history_raw, rounds_raw = raw["history"], raw["rounds"]
    if not isinstance(history_raw, list):
        raise LedgerFormatError(f"'history' is {_kind(history_raw)}, not a list")
    history = [_step(i, entry) for i, entry in enumerate(history_raw, 1)]
    if not isinstance(rounds_raw, list):
        raise LedgerFormatError(f"'rounds' is {_kind(rounds_raw)}, not a list")
    if len(rounds_raw) != len(history):
        # record() appends to both at once; a difference means entries were lost.
        raise LedgerFormatError(f"{len(history)} history entries but {len(rounds_raw)} rounds")
    rounds = [_round(i, entry, step) for i, (entry, step)
              in enumerate(zip(rounds_raw, history, strict=True), 1)]
    noise = raw["calibrated_noise"]
    if noise is not None:
        noise = _number(noise, "'calibrated_noise'")
        if not math.isfinite(noise) or noise <= 0:
            raise LedgerFormatError(f"'calibrated_noise' is {noise}, must be finite and above 0")
    return history, rounds, noise


def _step(index: int, entry: object) -> Step:
    where = f"history entry {index}"
    if not isinstance(entry, list):
        raise LedgerFormatError(f"{where} is {_kind(entry)}, not [noise, sample rate, steps]")
    if len(entry) != 3:
        raise LedgerFormatError(f"{where} has {len(entry)} items, not [noise, sample rate, steps]")
    noise = _number(entry[0], f"{where} noise multiplier")
    rate = _number(entry[1], f"{where} sample rate")
    if not math.isfinite(noise) or noise < 0:
        raise LedgerFormatError(f"{where} has noise multiplier {noise}, must be finite and "
                            "at least 0")
    if not 0 < rate <= 1:  # also rejects NaN
        raise LedgerFormatError(f"{where} has sample rate {rate}, must be in (0, 1]")
    steps = entry[2]
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise LedgerFormatError(f"{where} steps is {_kind(steps)}, not a whole number")
    if steps < 0:
        raise LedgerFormatError(f"{where} has negative steps ({steps})")
    return (noise, rate, steps)


def _round(index: int, entry: object, step: Step) -> dict[str, Any]:
    where = f"rounds entry {index}"
    if not isinstance(entry, dict):
        raise LedgerFormatError(f"{where} is {_kind(entry)}, not a JSON object")
    if sorted(entry) != sorted(_ROUND_KEYS):
        raise LedgerFormatError(f"{where} has keys {sorted(entry)}, expected "
                            f"{sorted(_ROUND_KEYS)}")
    server_round = entry["round"]
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise LedgerFormatError(f"{where} has round {server_round!r}, not a whole number >= 0")
    epsilon = _number(entry["epsilon"], f"{where} epsilon")
    if math.isnan(epsilon) or epsilon < 0:  # infinite is real: a round without noise
        raise LedgerFormatError(f"{where} has epsilon {epsilon}, must be at least 0")
    recorded = (entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
    if recorded != step:
        raise LedgerFormatError(f"{where} records {list(recorded)} but history entry {index} "
                            f"is {list(step)}")
    return dict(entry)


def _number(value: object, what: str) -> float:
    # bool is an int subclass in Python; JSON true/false is never a valid number here.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LedgerFormatError(f"{what} is {_kind(value)}, not a number")
    return float(value)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return f"a string ({value[:20]!r})"
    return f"a number ({value!r})"
