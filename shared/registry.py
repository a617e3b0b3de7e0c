"""Closed registries: one name, one entry, in one file.

Each extension point (networks, adaptation modes, strategies, central-DP
wrappers) is a :class:`Registry` built once at import time from a literal
mapping, in the style of Opacus's accountant registry. Adding a network or a
strategy is one entry in that mapping; the config's allowed values, the error
for an unknown name and the README's table of keys all read from it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not in a registry; the message suggests the closest one."""

    def __init__(self, kind: str, name: str, problem: str) -> None:
        super().__init__(name)
        self.kind = kind
        self.name = name
        self.problem = problem

    def __str__(self) -> str:
        return f"unknown {self.kind} {self.problem}"


class Registry(Generic[T]):
    """An immutable mapping from names to entries, with helpful look-up errors.

    Parameters
    ----------
    kind : str
        What the entries are (``"network"``), for error messages.
    entries : Mapping[str, T]
        The entries, in the order they are listed to users.
    """

    def __init__(self, kind: str, entries: Mapping[str, T]) -> None:
        self.kind = kind
        self._entries = dict(entries)

    def names(self) -> tuple[str, ...]:
        """Return every registered name, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def problem(self, name: str) -> str:
        """Return why ``name`` is not accepted, naming the choices and the closest one."""
        close = difflib.get_close_matches(name, self._entries, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"must be one of {', '.join(self._entries)}, got {name!r}{hint}"

    def __getitem__(self, name: str) -> T:
        """Return the entry of ``name``.

        Raises
        ------
        UnknownNameError
            ``name`` is not registered; the message lists the valid names.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.problem(name)) from None
