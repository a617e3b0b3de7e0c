"""Lint and type checks as part of the suite, so CI enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_ruff_clean() -> None:
    result = subprocess.run([tool("ruff"), "check", "."], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    result = subprocess.run([tool("mypy")], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_server_and_client_never_import_each_other() -> None:
    for package, forbidden in (("server", "client"), ("client", "server"),
                               ("shared", "server"), ("shared", "client")):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            assert f"from {forbidden}" not in text and f"import {forbidden}" not in text, (
                f"{path.relative_to(REPO)} imports {forbidden}/")
