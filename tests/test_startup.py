"""Start-up: each ``fedseg`` verb loads only the libraries it needs.

Importing PyTorch and MONAI takes seconds; ``fedseg --help``, ``plan``, ``site
check`` and ``report`` need neither, and ``predict`` needs them but not Opacus or
Flower. Each command runs in a fresh interpreter, as from the shell, which then
lists the heavy libraries it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.checkpoint import Checkpoint
from shared.config import ModelSpec
from shared.networks import build_network
from shared.weights import state_to_numpy
from simulations.phantoms import write_synthetic_federation
from tests.conftest import REPO
from tests.test_report import build_run

HEAVY = ("torch", "monai", "opacus", "flwr")


def run_fedseg(*argv: str) -> tuple[int, list[str]]:
    """Run ``fedseg argv`` in a new interpreter; return its exit status and heavy imports.

    Also fails unless ``OMP_WAIT_POLICY``, removed from the environment first, is
    ``PASSIVE`` exactly when the command loaded torch (``fedseg predict`` sets it).
    """
    code = (
        "import json, os, sys\n"
        "from fedseg.cli import main\n"
        "try:\n"
        f"    status = main({list(argv)!r})\n"
        "except SystemExit as exc:\n"
        "    status = exc.code\n"
        "policy = os.environ.get('OMP_WAIT_POLICY')\n"
        "assert (policy == 'PASSIVE') == ('torch' in sys.modules), policy\n"
        f"print(json.dumps([status, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    status, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    return int(status or 0), list(loaded)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sites")
    return write_synthetic_federation(root, num_sites=1, cases_per_site=4, shape=(32, 32))[0]


@pytest.mark.parametrize("argv", [("--help",), ("predict", "--help"), ("site", "check", "--help")],
                         ids=["help", "predict-help", "site-check-help"])
def test_help_loads_no_heavy_library(argv: tuple[str, ...]) -> None:
    assert run_fedseg(*argv) == (0, [])


def test_plan_and_site_check_load_no_heavy_library(site: Path, tmp_path: Path) -> None:
    assert run_fedseg("plan", "--data", str(site.parent)) == (0, [])
    # The private plan too, with its line on the starting model: only Flower's config
    # parser loads, which reads the TOML as flower-supernode --node-config does.
    dp = tmp_path / "dp-site.toml"
    dp.write_text("dp-enabled = true\ndp-target-epsilon = 8\ndp-max-epsilon = 8\n")
    assert run_fedseg("plan", "--data", str(site.parent), "--site-config", str(dp)) == (
        0, ["flwr"])
    assert run_fedseg("site", "check", "--data", str(site)) == (0, [])


def test_report_loads_no_heavy_library(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    assert run_fedseg("report", str(run.path), "--output", str(tmp_path / "r.html")) == (0, [])
    assert (tmp_path / "r.html").is_file()


def test_predict_loads_neither_opacus_nor_flower(tmp_path: Path, site: Path) -> None:
    spec = ModelSpec(channels=(4, 8), patch_size=(16, 16))
    torch.manual_seed(0)
    model = tmp_path / "final_model.pt"
    Checkpoint(spec, state_to_numpy(build_network(spec).state_dict()), 1).save(model)
    status, loaded = run_fedseg("predict", "--model", str(model), "--input",
                                str(site / "imagesTr"), "--output", str(tmp_path / "masks"),
                                "--device", "cpu")
    # The network and the sliding window are MONAI's, so torch and monai must load.
    assert (status, loaded) == (0, ["torch", "monai"])
    assert len(list((tmp_path / "masks").iterdir())) == 4
