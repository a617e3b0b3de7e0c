"""fedseg simulate --site-config: node-config keys every simulated site takes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedseg.cli import EXIT_BAD_INPUT, main
from shared.errors import FedsegError
from shared.run_files import FINAL_MODEL, METRICS_JSON, RunFiles
from simulations.simulate import (
    SimulationRequest,
    record_simulation,
    recorded_site_settings,
    simulated_sites,
)
from simulations.sites import read_site_settings

# The file, as a hospital would write it.
DP_SITE = ("dp-enabled = true\ndp-target-epsilon = 8\ndp-max-epsilon = 8\n"
           "dp-delta = 1e-5\n")


def toml(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_simulated_site_takes_the_file_s_settings(tmp_path: Path) -> None:
    values = read_site_settings(toml(tmp_path, DP_SITE + "num-threads = 2\n"))
    assert values == {"dp-enabled": True, "dp-target-epsilon": 8, "dp-max-epsilon": 8,
                      "dp-delta": 1e-5, "num-threads": 2}
    folders = [tmp_path / "data" / "a", tmp_path / "data" / "b"]
    sites = simulated_sites(folders, tmp_path / "run", values)
    for i, (site, folder) in enumerate(zip(sites, folders, strict=True)):
        assert (site.data_path, site.site_name, site.seed) == (folder, folder.name, i)
        assert site.state_dir == tmp_path / "run" / "site-state" / folder.name
        assert site.privacy.enabled and site.privacy.target_epsilon == 8.0
        assert site.privacy.max_epsilon == 8.0 and site.privacy.delta == 1e-5
        assert site.privacy.planned_rounds == 0  # calibrated over the run's rounds
        assert (site.num_threads, site.device) == (2, "auto")
    plain = simulated_sites(folders, tmp_path / "run")
    assert not plain[0].privacy.enabled and math.isinf(plain[0].privacy.max_epsilon)
    assert plain[0].num_threads == 1


def test_a_resumed_simulation_keeps_its_site_settings(tmp_path: Path) -> None:
    values = read_site_settings(toml(tmp_path, DP_SITE))
    run = tmp_path / "run"
    run.mkdir()
    record_simulation(run, SimulationRequest(site_settings=values), [tmp_path / "a"])
    assert recorded_site_settings(run) == values
    assert json.loads(RunFiles(run).simulation_json.read_text())["site-config"]["dp-enabled"]


@pytest.mark.parametrize("text,message", [
    ("dp-enabeld = true\n", "key 'dp-enabeld': is not a fedseg site setting"),
    ("data-path = '/srv/x'\n", "key 'data-path': is set by fedseg simulate for each site"),
    ("seed = 3\n", "key 'seed': is set by fedseg simulate for each site"),
    ("dp-delta = 2\n", "key 'dp-delta': must be less than 1.0, got 2.0"),
    ("dp-enabled = 'perhaps'\n", "key 'dp-enabled': expected true or false"),
    ("dp-enabled = true\n", "key 'dp-noise-multiplier': is 0 with DP enabled"),
    ("dp-enabled = \n", "not valid TOML"),
])
def test_bad_site_config_is_one_line_naming_file_and_key(tmp_path: Path, text: str,
                                                          message: str) -> None:
    path = toml(tmp_path, text)
    with pytest.raises(FedsegError) as err:
        read_site_settings(path)
    line = str(err.value)
    assert "\n" not in line and message in line
    assert line.startswith(f"--site-config {path}")


def test_missing_or_misnamed_file(tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match=r"site\.toml: file not found"):
        read_site_settings(tmp_path / "site.toml")
    with pytest.raises(FedsegError, match=r"must be a \.toml file"):
        read_site_settings(toml(tmp_path, DP_SITE, "site.cfg"))


def test_cli_refuses_a_bad_site_config_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    code = main(["simulate", "--output", str(out),
                 "--site-config", str(toml(tmp_path, "dp-enabeld = true\n"))])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and "\n" not in err
    assert err.startswith(f"fedseg: error: --site-config {tmp_path / 'site.toml'} key "
                          "'dp-enabeld': is not a fedseg site setting")
    assert not out.exists()
    code = main(["simulate", "--resume", str(out), "--site-config", str(tmp_path / "site.toml")])
    assert code == EXIT_BAD_INPUT
    assert "--resume keeps the site settings the run recorded; drop --site-config" in (
        capsys.readouterr().err)
    assert not list(tmp_path.rglob(FINAL_MODEL)) and not list(tmp_path.rglob(METRICS_JSON))


def test_fedseg_plan_with_the_sites_dp_settings_plans_for_dp(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.phantoms import write_synthetic_federation

    write_synthetic_federation(tmp_path / "data", num_sites=2, cases_per_site=6, shape=(32, 32))
    assert main(["plan", "--data", str(tmp_path / "data")]) == 0
    plain = capsys.readouterr().out
    assert main(["plan", "--data", str(tmp_path / "data"),
                 "--site-config", str(toml(tmp_path, DP_SITE))]) == 0
    private = capsys.readouterr().out
    assert "DP-SGD" not in plain and "batch-size = 8" in plain
    # 6 cases of 6 patients, 1 held out: 5 training patients per site, a batch of 8 at least.
    assert "2 site(s) train under DP-SGD, the smallest with 5 patients" in private
    assert "num-server-rounds = 5" in private
