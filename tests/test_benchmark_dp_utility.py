"""Dice against epsilon (issue 11): the same run config at every epsilon, reduced over seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.dp_utility import ALONE, DELTA, FEDERATED, main, markdown, site_settings, summarise
from simulations.phantoms import write_synthetic_federation


def _sites(a: float, b: float, eps: float | None) -> dict[str, dict[str, object]]:
    return {"a": {"dice": a, "cases": 1, "epsilon": eps},
            "b": {"dice": b, "cases": 3, "epsilon": eps}}


def test_site_settings_are_the_four_key_toml_and_none_without_dp() -> None:
    assert site_settings(4.0) == {"dp-enabled": True, "dp-target-epsilon": 4.0,
                                  "dp-max-epsilon": 4.0, "dp-delta": DELTA}
    assert site_settings(math.inf) == {}


def test_summary_is_mean_and_sample_std_per_site_and_case_weighted_mean() -> None:
    rows = [
        {"setting": FEDERATED, "epsilon": 8.0, "seed": 0, "sites": _sites(0.5, 0.9, 7.9)},
        {"setting": FEDERATED, "epsilon": 8.0, "seed": 1, "sites": _sites(0.7, 0.7, 7.99)},
        {"setting": FEDERATED, "epsilon": math.inf, "seed": 0, "sites": _sites(0.8, 1.0, None)},
        # Alone: one run per site and seed, merged into one row of the table.
        {"setting": ALONE, "epsilon": 8.0, "seed": 0,
         "sites": {"a": {"dice": 0.2, "cases": 1, "epsilon": 8.0}}},
        {"setting": ALONE, "epsilon": 8.0, "seed": 0,
         "sites": {"b": {"dice": 0.6, "cases": 3, "epsilon": 7.5}}},
    ]
    summary = summarise(rows, ["a", "b"])
    assert list(summary) == ["federated eps=inf", "federated eps=8", "alone eps=8"]
    fed = summary["federated eps=8"]
    assert fed["dice"]["a"]["mean"] == pytest.approx(0.6)
    assert fed["dice"]["a"]["std"] == pytest.approx(math.sqrt(0.02))
    assert fed["dice"]["b"]["mean"] == pytest.approx(0.8)
    # Seed 0: (0.5 * 1 + 0.9 * 3) / 4 = 0.8; seed 1: 0.7.
    assert fed["dice"]["mean"]["mean"] == pytest.approx(0.75)
    assert fed["spent"] == {"a": 7.99, "b": 7.99}
    assert fed["seeds"] == [0, 1]
    none = summary["federated eps=inf"]
    assert none["dice"]["mean"] == {"mean": pytest.approx(0.95), "std": 0.0}
    assert none["spent"] == {"a": None, "b": None}
    alone = summary["alone eps=8"]
    assert alone["dice"]["mean"]["mean"] == pytest.approx((0.2 + 0.6 * 3) / 4)
    assert alone["spent"] == {"a": 8.0, "b": 7.5}


def test_a_site_missing_from_a_seed_leaves_the_mean_undefined() -> None:
    rows = [{"setting": FEDERATED, "epsilon": 2.0, "seed": 0,
             "sites": {"a": {"dice": 0.5, "cases": 1, "epsilon": 2.0}}}]
    summary = summarise(rows, ["a", "b"])["federated eps=2"]
    assert summary["dice"]["b"] == {"mean": None, "std": None}
    assert summary["dice"]["mean"] == {"mean": None, "std": None}
    assert "n/a" in markdown({"data": "d", "sites": ["a", "b"], "seeds": [0], "run_config": {},
                              "zero_shot": {}, "summary": {"federated eps=2": summary}})


@pytest.mark.parametrize("argv", [["--epsilons", "0"], ["--epsilons", "-1"], ["--seeds", "0"],
                                  ["--first-seed", "-1"]])
def test_bad_arguments_are_one_line(argv: list[str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--data", str(tmp_path), *argv])
    assert stop.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()[-1]) > 0


def test_a_missing_data_folder_is_one_line_naming_it(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--data", str(tmp_path / "nowhere")])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nowhere: data folder not found" in last and "Traceback" not in last


def test_one_epsilon_and_no_dp_alone_and_federated_write_json_markdown_and_png(
        tmp_path: Path) -> None:
    data = tmp_path / "sites"
    write_synthetic_federation(data, num_sites=2, cases_per_site=6, shape=(32, 32))
    out = tmp_path / "out"
    assert main(["--data", str(data), "--epsilons", "8", "--seeds", "1", "--first-seed", "2",
                 "--alone", "--output", str(out), "--run-config",
                 "num-server-rounds=1 local-steps=2 channels='8,16' batch-size=2"]) == 0
    report = json.loads((out / "dp-utility.json").read_text())
    assert list(report["summary"]) == ["federated eps=inf", "federated eps=8",
                                       "alone eps=inf", "alone eps=8"]
    sites = report["sites"]
    # --first-seed 2 --seeds 1: seed 2 alone, in every run.
    assert report["seeds"] == [2] and {run["seed"] for run in report["runs"]} == {2}
    for name, result in report["summary"].items():
        for site in sites:
            assert result["dice"][site]["mean"] is not None, (name, site)
            spent = result["spent"][site]
            if name.endswith("eps=8"):
                assert 0 < spent <= 8.0
            else:
                assert spent is None
    # Every run took the same run config: the private plan under the overrides.
    assert report["run_config"]["local-steps"] == 2
    assert (out / "dp-utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "federated eps=8" in (out / "dp-utility.md").read_text()
