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


def test_import_graph_contracts() -> None:
    # [tool.importlinter] in pyproject.toml: server and client independent, shared below
    # both, Opacus never on the coordinator's side, no cycles inside any package.
    result = subprocess.run([tool("lint-imports"), "--no-cache", "--no-logo"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_server_app_imports_no_opacus() -> None:
    import json
    import os

    code = ("import json, sys; import server.app; "
            "print(json.dumps({m: m in sys.modules for m in ('opacus', 'monai.transforms')}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert not loaded["opacus"]
    # `import monai` itself loads monai.transforms (MONAI's package __init__ imports
    # every sub-package), so the network builders cannot avoid it; not asserted.
