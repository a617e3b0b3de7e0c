"""The performance suite (issue 13): its pure helpers exactly, and a --quick smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.suite import SECTIONS, SimulationRun, Timed, main, process_tree
from server.history import MetricsHistory, RoundRecord


def _timed() -> Timed:
    lines = [(2.0, "writing 2 synthetic 2D sites to x"), (3.0, "2 sites, 2 rounds, strategy"),
             (3.5, "  site-a           3 train /   1 val cases  (x)"),
             (4.0, "  site-b           3 train /   1 val cases  (x)"),
             (20.0, "round 1/2: mean val Dice 0.5"), (26.0, "round 2/2: mean val Dice 0.6"),
             (27.0, "cross-site evaluation: each site"), (29.0, "report x")]
    return Timed(lines, wall_s=30.0, returncode=0,
                 cpu=[(1.0, 1.0), (4.0, 5.0), (20.0, 30.0), (26.0, 40.0), (27.0, 41.0),
                      (29.5, 44.0)])


def test_phases_come_from_the_output_timestamps_and_metrics() -> None:
    history = MetricsHistory({}, [RoundRecord(1, train_seconds=9.0, evaluate_seconds=1.0),
                                  RoundRecord(2, train_seconds=5.0, evaluate_seconds=0.5)])
    run = SimulationRun(_timed(), Path("run"), history)
    assert run.round_seconds == [10.0, 5.5]
    assert run.phases() == {
        "interpreter_and_imports_s": 2.0, "synthetic_data_s": 1.0, "preflight_s": 1.0,
        # Round 1 ended at 20 s after 10 s: it began 6 s after the preflight.
        "flower_start_to_round1_s": 6.0, "rounds_s": 15.5, "flower_wall_s": 23.0,
        "after_flower_s": 3.0, "command_wall_s": 30.0}
    assert run.cpu() == {"command_s": 44.0, "flower_s": 36.0, "later_rounds_s": 10.0}
    assert run.timed.cpu_at(3.9) == 1.0 and run.timed.cpu_at(0.5) == 0.0


def test_process_tree_holds_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        members, cpu = process_tree(os.getpid())
        assert members[0] == os.getpid() and child.pid in members
        assert set(cpu) <= set(members) and all(c >= 0 for c in cpu.values())
    finally:
        child.kill()
        child.wait()


@pytest.mark.e2e
def test_quick_suite_runs_every_section(tmp_path: Path) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "suite.json").read_text())
    assert set(SECTIONS) <= set(results) and results["quick"]
    federation = results["federation"]
    # The same steps, network, data and seeds: the direct run lands on the same model.
    assert federation["direct"]["final_mean_dice"] == pytest.approx(
        federation["simulation"]["final_mean_dice"], abs=1e-3)
    assert federation["ratio_excluding_startup"] > 0
    assert results["acceptance"]["float16_bytes_halve"]["met"]
    assert [r["sites"] for r in results["scale"]["runs"]] == [2]
    assert results["scale"]["runs"][0]["peak_processes"] > 3  # Ray's processes were seen
    assert len(results["throughput"]["runs"]) >= 2
    assert (tmp_path / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
