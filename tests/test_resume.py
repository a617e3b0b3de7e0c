"""Resuming a run from its run folder, on a fake Grid (exact values) and with bad input."""

from __future__ import annotations

import random
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from server.app import make_server_app
from server.federation import RunFolder, run_federation
from server.history import MetricsHistory
from server.resume import (
    ResumeError,
    ResumeState,
    capture_rng,
    restore_rng,
    resume_point,
    strategy_state,
)
from server.strategies import build_strategy
from shared import protocol as p
from shared.checkpoint import Checkpoint
from tests.conftest import REPO, FakeGrid, fingerprint_reply
from tests.test_federation import config, initial, site


class _Silent:
    def round_finished(self, record: object, num_rounds: int) -> None:
        pass


class CoordinatorKilledError(Exception):
    """The coordinator dies in the middle of a round."""


def pyproject(**kw: Any) -> dict[str, Any]:
    """Return the run config ``flwr run`` would pass: pyproject's table plus ``kw``."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**table, "channels": "8,16", "patch-size": "16,16", **kw}


def moving_site(name: str, scale: float, crash_in_round: int = 0):
    """Return a site that plans, trains (its update changes with the round) and evaluates."""

    def respond(msg: Message) -> Message:
        if msg.metadata.message_type == p.FINGERPRINT_QUERY:
            return fingerprint_reply(msg)
        rnd = int(msg.content.config_records[p.CONFIG]["server-round"])
        if rnd == crash_in_round:
            raise CoordinatorKilledError(f"coordinator killed in round {rnd}")
        arrays = {k: v.numpy() for k, v in msg.content.array_records[p.ARRAYS].items()}
        # Updates that change size and sign from round to round, so FedAdam's first and
        # second moments both shape the next step.
        moved = {k: (v + scale * (1 + rnd % 3) * np.cos(np.arange(v.size) + rnd)
                     .reshape(v.shape)).astype(v.dtype) for k, v in arrays.items()}
        return site(name, moved, 2 + int(scale * 10), 0.5)(msg)

    return respond


def run_app(values: dict[str, Any], grid: FakeGrid, run_id: int,
            lines: list[str] | None = None) -> None:
    app = make_server_app(reporter=_Silent(), echo=(lines if lines is not None else []).append)
    app(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),  # type: ignore[arg-type]
                      run_config=values))


def weights_of(path: Path) -> dict[str, np.ndarray]:
    return Checkpoint.load(path).weights


@pytest.mark.faults
def test_fedadam_killed_after_round_2_resumes_to_the_uninterrupted_weights(
        tmp_path: Path) -> None:
    settings = {"strategy": "fedadam", "num-server-rounds": 4}
    run_app(pyproject(**settings, **{"output-dir": str(tmp_path / "a")}),
            FakeGrid({1: moving_site("a", 0.1), 2: moving_site("b", 0.3)}), run_id=1)

    with pytest.raises(CoordinatorKilledError):
        run_app(pyproject(**settings, **{"output-dir": str(tmp_path / "b")}),
                FakeGrid({1: moving_site("a", 0.1, crash_in_round=3),
                          2: moving_site("b", 0.3)}), run_id=2)
    folder = RunFolder(tmp_path / "b" / "run-2")
    assert ResumeState.load(folder.path).server_round == 2
    assert not folder.final_model.exists()
    saved = ResumeState.load(folder.path).strategy
    assert sorted(saved) == ["current_arrays", "m_t", "v_t"]

    # The resumed run's config is pyproject's: strategy at its default (fedavg) and the
    # planned keys at auto both mean "as saved", so it stays FedAdam and is not re-planned.
    lines: list[str] = []
    grid = FakeGrid({1: moving_site("a", 0.1), 2: moving_site("b", 0.3)})
    run_app(pyproject(**{"resume-from": str(folder.path)}), grid, run_id=3, lines=lines)
    assert lines == [f"resume: continuing {folder.path} after round 2 of 4"]
    assert all(m.metadata.message_type != p.FINGERPRINT_QUERY for m in grid.sent)
    assert {int(m.content.config_records[p.CONFIG]["server-round"]) for m in grid.sent
            if m.metadata.message_type == "train"} == {3, 4}
    assert not (tmp_path / "b" / "run-3").exists()

    expected = weights_of(RunFolder(tmp_path / "a" / "run-1").final_model)
    resumed = weights_of(folder.final_model)
    assert expected.keys() == resumed.keys()
    assert all(np.array_equal(expected[k], resumed[k]) for k in expected)
    history = MetricsHistory.read(folder.metrics_json)
    assert [r.round for r in history.rounds] == [1, 2, 3, 4]
    assert folder.metrics_csv.read_text().count("\n") == 1 + 4 * 2
    assert Checkpoint.load(folder.final_model).spec.normalization == "zscore-fov"  # the plan's
    assert ResumeState.load(folder.path).server_round == 4


@pytest.mark.faults
def test_moments_are_lost_without_the_resume_state(tmp_path: Path) -> None:
    # The control for the test above: the same resume with the strategy's state dropped
    # ends elsewhere, so the equality there is the saved moments' doing.
    settings = {"strategy": "fedadam", "num-server-rounds": 4}
    run_app(pyproject(**settings, **{"output-dir": str(tmp_path / "a")}),
            FakeGrid({1: moving_site("a", 0.1), 2: moving_site("b", 0.3)}), run_id=1)
    run_app(pyproject(**{**settings, "num-server-rounds": 2, "output-dir": str(tmp_path / "b")}),
            FakeGrid({1: moving_site("a", 0.1), 2: moving_site("b", 0.3)}), run_id=2)
    folder = RunFolder(tmp_path / "b" / "run-2")
    state = ResumeState.load(folder.path)
    state.strategy = {}
    state.save(folder.resume_state)
    # Raising num-server-rounds from 2 to 4 extends the finished run.
    run_app(pyproject(**{"resume-from": str(folder.path), "num-server-rounds": 4}),
            FakeGrid({1: moving_site("a", 0.1), 2: moving_site("b", 0.3)}), run_id=3)
    expected = weights_of(RunFolder(tmp_path / "a" / "run-1").final_model)
    resumed = weights_of(folder.final_model)
    assert not all(np.array_equal(expected[k], resumed[k]) for k in expected)
    assert [r.round for r in MetricsHistory.read(folder.metrics_json).rounds] == [1, 2, 3, 4]


def test_central_dp_wrapper_state_is_its_inner_fedadams() -> None:
    strategy = build_strategy(config(strategy="fedadam", **{"central-dp": "server-side"}))
    inner = strategy.strategy  # type: ignore[attr-defined]
    inner.m_t = {"w": np.ones(2)}
    assert list(strategy_state(strategy)) == ["m_t"]
    assert strategy_state(build_strategy(config())) == {}


def test_random_generators_come_back() -> None:
    saved = capture_rng()
    drawn = (random.random(), float(np.random.normal()), float(torch.rand(1)))
    restore_rng(saved)
    assert (random.random(), float(np.random.normal()), float(torch.rand(1))) == drawn


# --- refusals -----------------------------------------------------------------------------

def saved_run(tmp_path: Path, rounds: int = 2, **kw: object) -> Path:
    grid = FakeGrid({1: site("a", {"w": np.ones(2), "b": np.ones((1, 2))}, 1, 0.5),
                     2: site("b", {"w": np.ones(2), "b": np.ones((1, 2))}, 1, 0.5)})
    run_federation(grid, config(**{"num-server-rounds": rounds, **kw}), initial(),
                   RunFolder(tmp_path), reporter=_Silent())  # type: ignore[arg-type]
    return tmp_path


def refusal(values: dict[str, Any]) -> str:
    with pytest.raises(ResumeError) as info:
        resume_point(values)
    return str(info.value)


def test_fresh_run_when_resume_from_is_empty() -> None:
    assert resume_point({"resume-from": ""}) is None
    assert resume_point({}) is None


@pytest.mark.faults
def test_missing_folder_and_missing_state_are_refused(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    assert refusal({"resume-from": str(gone)}) == (
        f"resume-from {gone}: run folder not found; pass the folder of the run to continue, "
        "e.g. runs/run-<run id>")
    assert refusal({"resume-from": str(tmp_path)}) == (
        f"resume-from {tmp_path}: has no resume-state.pt, so no round of it finished (or it is "
        "not a fedseg run folder); leave resume-from empty to start a fresh run")


@pytest.mark.faults
def test_damaged_state_is_refused(tmp_path: Path) -> None:
    folder = RunFolder(saved_run(tmp_path))
    data = folder.resume_state.read_bytes()
    folder.resume_state.write_bytes(data[: len(data) // 2])
    line = refusal({"resume-from": str(tmp_path)})
    assert line.startswith(f"resume-from {tmp_path}: resume-state.pt is damaged (")
    assert line.endswith("it is written atomically, so it was changed after the run; restore "
                         "it from a backup or leave resume-from empty to start a fresh run")
    assert "\n" not in line
    torch.save({"format": "something-else"}, folder.resume_state)
    assert refusal({"resume-from": str(tmp_path)}) == (
        f"resume-from {tmp_path}: resume-state.pt has format 'something-else', not "
        "'fedseg-resume/1'; resume it with the fedseg version that wrote it")
    torch.save({"format": "fedseg-resume/1", "round": 2}, folder.resume_state)
    assert "resume-state.pt is damaged (KeyError" in refusal({"resume-from": str(tmp_path)})


def test_finished_run_is_refused_unless_extended(tmp_path: Path) -> None:
    saved_run(tmp_path, rounds=2)
    assert refusal({"resume-from": str(tmp_path)}) == (
        f"resume-from {tmp_path}: the run already finished 2 rounds (num-server-rounds 2); set "
        "num-server-rounds above 2 to extend it, or leave resume-from empty to start a fresh "
        "run")
    assert "already finished 2 rounds (num-server-rounds 1)" in refusal(
        {"resume-from": str(tmp_path), "num-server-rounds": 1})
    point = resume_point({"resume-from": str(tmp_path), "num-server-rounds": 5})
    assert point is not None and point.config.num_server_rounds == 5
    assert point.state.server_round == 2


def test_a_run_saved_before_a_key_was_added_resumes_with_its_default(tmp_path: Path) -> None:
    folder = RunFolder(saved_run(tmp_path, rounds=2))
    payload = torch.load(folder.resume_state, weights_only=True)
    del payload["run-config"]["downsample"]  # as a run folder of an earlier fedseg has it
    torch.save(payload, folder.resume_state)
    point = resume_point({"resume-from": str(tmp_path), "num-server-rounds": 3,
                          "downsample": "none"})
    assert point is not None and point.config.model.downsample == ()
    assert "downsample 'none' -> '2,2'" in refusal(
        {"resume-from": str(tmp_path), "num-server-rounds": 3, "downsample": "2,2"})


def test_changing_a_saved_setting_is_refused(tmp_path: Path) -> None:
    saved_run(tmp_path, rounds=3, **{"channels": "8,16"})
    assert refusal({"resume-from": str(tmp_path), "channels": "16,32", "strategy": "fedprox",
                    "num-server-rounds": 4}) == (
        f"resume-from {tmp_path}: the run config changes channels '8,16' -> '16,32', strategy "
        "'fedavg' -> 'fedprox', but a resumed run keeps the settings it started with; remove "
        "those keys from the run config (only num-server-rounds may change, to extend the run)")
    # Values equal to the saved ones, however spelt, and where to write, are no change.
    point = resume_point({"resume-from": str(tmp_path), "channels": "8, 16",
                          "min-train-nodes": 2.0, "output-dir": "elsewhere",
                          "num-server-rounds": 4})
    assert point is not None and point.config.model.channels == (8, 16)
    assert point.config.output_dir == Path("runs")



def test_simulate_resume_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedseg.cli import main

    def error(*args: str) -> str:
        assert main(["simulate", *args]) == 2
        return capsys.readouterr().err

    gone = tmp_path / "gone"
    assert error("--resume", str(gone)) == (
        f"fedseg: error: --resume {gone}: run folder not found; pass the folder of the "
        "simulation to continue, e.g. runs/sim-<time>\n")
    deployed = saved_run(tmp_path / "deployed")
    capsys.readouterr()  # Flower's log of that run
    assert error("--resume", str(deployed)) == (
        f"fedseg: error: --resume {deployed}: has no simulation.json, so it is not a run folder "
        "of fedseg simulate; pass a folder runs/sim-<time>/ it wrote, or continue a deployed "
        "run with the run config's resume-from\n")
    assert error("--resume", str(deployed), "--data", str(tmp_path)) == (
        "fedseg: error: fedseg simulate: --resume continues on the sites the run recorded; "
        "drop --data\n")
    (deployed / "simulation.json").write_text('{"sites": []}')
    assert "already finished 2 rounds" in error("--resume", str(deployed))
    assert "changes channels" in error("--resume", str(deployed), "--rounds", "3",
                                       "--run-config", "channels='4,8'")
    (deployed / "simulation.json").write_text("{")
    assert error("--resume", str(deployed)) == (
        f"fedseg: error: --resume {deployed}: simulation.json is damaged (JSONDecodeError); "
        "restore it from a backup\n")


# --- end to end: a simulation killed after round 2 of 4, resumed -----------------------------

TINY = {"num_sites": 2, "cases_per_site": 5, "synthetic_size": 32,
        "overrides": {"num-server-rounds": 4, "local-steps": 2, "batch-size": 2,
                      "channels": "4,8", "patch-size": "32,32"}}


@pytest.mark.e2e
@pytest.mark.faults
def test_simulation_killed_after_round_2_resumes_to_identical_weights(tmp_path: Path) -> None:
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys

    from fedseg.cli import main
    from simulations.simulate import SimulationRequest, run_simulation

    whole = run_simulation(SimulationRequest(output=tmp_path / "whole", **TINY),  # type: ignore[arg-type]
                           echo=lambda line: None)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.killed_simulation", str(tmp_path / "killed"), "2",
         json.dumps(TINY)], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        # Ray's helpers share the killed process's session: end them with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, out
    (run_dir,) = (tmp_path / "killed").iterdir()
    folder = RunFolder(run_dir)
    assert ResumeState.load(run_dir).server_round == 2 and not folder.final_model.exists()

    assert main(["simulate", "--resume", str(run_dir)]) == 0
    expected, resumed = weights_of(whole.final_model), weights_of(folder.final_model)
    assert expected.keys() == resumed.keys()
    differ = {k: float(np.abs(expected[k] - resumed[k]).max()) for k in expected
              if not np.array_equal(expected[k], resumed[k])}
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ}"
    history = MetricsHistory.read(folder.metrics_json)
    assert [r.round for r in history.rounds] == [1, 2, 3, 4]
    assert all(r.aggregated and len(r.sites) == 2 for r in history.rounds)
    # Finished: resuming again is refused with one line, before Ray starts.
    assert main(["simulate", "--resume", str(run_dir)]) == 2
