"""Error types whose messages a user can act on.

Every error raised for bad input is a :class:`FedsegError` with a one-line message
that names the file or setting, the problem, and what to do. Command-line entry
points print that line and exit non-zero instead of showing a traceback.
"""

from __future__ import annotations

from pathlib import Path


class FedsegError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class ConfigError(FedsegError):
    """A run-config or node-config value is missing or invalid."""

    def __init__(self, source: str, key: str, problem: str, fix: str) -> None:
        self.source = source
        self.key = key
        super().__init__(f"{source} key '{key}': {problem}; {fix}")


class DataError(FedsegError):
    """A site's data folder, image or label cannot be used."""

    def __init__(self, path: Path | str, problem: str, fix: str = "") -> None:
        self.path = Path(path)
        self.problem = problem
        message = f"{self.path}: {problem}"
        if fix:
            message += f"; {fix}"
        super().__init__(message)
