"""Crashes between writing a state file and renaming it into place, at a site and the server.

Every state file is written through :func:`shared.atomic.write_atomic`: a temporary
file beside the target, then ``os.replace``. These tests cut the power (an
exception, or an interrupt as a kill would) after the temporary file is complete
and before the rename, and check that what is on disk is still the previous
version, loadable, with no temporary file left behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from client.privacy_ledger import FILE_NAME as LEDGER_FILE
from client.privacy_ledger import PrivacyLedger
from client.site_state import FILE_NAME as LAYERS_FILE
from client.site_state import load_local_layers, save_local_layers

pytestmark = pytest.mark.faults

THIRD = 1 / 3
_real_replace = os.replace


class PowerCutError(OSError):
    """The machine went down between writing the temporary file and renaming it."""


@contextmanager
def crash_before_rename(monkeypatch: pytest.MonkeyPatch, target: str,
                        crash: type[BaseException] = PowerCutError) -> Iterator[list[Path]]:
    """Make the rename onto a file called ``target`` fail, after checking its temp is whole."""
    written: list[Path] = []

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst).name != target:
            _real_replace(src, dst)
            return
        tmp = Path(src)
        assert tmp.is_file() and tmp.stat().st_size > 0, "the crash must follow a full write"
        written.append(tmp)
        raise crash(f"power cut before renaming {tmp.name}")

    with monkeypatch.context() as m:
        m.setattr("shared.atomic.os.replace", replace)
        yield written


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("crash", [PowerCutError, KeyboardInterrupt])
def test_a_crash_before_rename_keeps_the_previous_ledger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: type[BaseException]) -> None:
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, calibrated_noise=1.3)
    ledger.record((1.1, THIRD, 3), 1, 0.5)
    ledger.record((1.3, 0.5, 2), 2, 0.9)
    before = (tmp_path / LEDGER_FILE).read_bytes()
    with crash_before_rename(monkeypatch, LEDGER_FILE, crash) as written, pytest.raises(crash):
        ledger.record((1.1, THIRD, 4), 3, 1.2)
    assert written  # the crash did happen after the third round was written out
    assert (tmp_path / LEDGER_FILE).read_bytes() == before
    reloaded = PrivacyLedger.load(tmp_path)
    assert reloaded.history == [(1.1, THIRD, 3), (1.3, 0.5, 2)]
    assert [r["round"] for r in reloaded.rounds] == [1, 2]
    assert reloaded.calibrated_noise == 1.3
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("crash", [PowerCutError, KeyboardInterrupt])
def test_a_crash_before_rename_keeps_the_previous_local_layers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: type[BaseException]) -> None:
    old = {"norm.weight": np.arange(4, dtype=np.float32), "norm.bias": np.zeros(4, np.float32)}
    new = {k: v + 7 for k, v in old.items()}
    save_local_layers(tmp_path, "local-norm", old)
    with crash_before_rename(monkeypatch, LAYERS_FILE, crash) as written, pytest.raises(crash):
        save_local_layers(tmp_path, "local-norm", new)
    assert written
    loaded = load_local_layers(tmp_path, "local-norm", {k: (4,) for k in old})
    assert loaded is not None
    for key, value in old.items():
        np.testing.assert_array_equal(loaded[key], value)
    assert leftovers(tmp_path) == []


def test_a_crash_before_the_first_save_leaves_no_file(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A site that never saved before is a new site after the crash, not a damaged one.
    with crash_before_rename(monkeypatch, LEDGER_FILE), pytest.raises(PowerCutError):
        PrivacyLedger(tmp_path / LEDGER_FILE).record((1.1, THIRD, 3), 1, 0.5)
    assert PrivacyLedger.load(tmp_path).history == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _dp_adaptation_trainer(tmp_path: Path):  # type: ignore[no-untyped-def]
    from client.config import SiteConfig
    from client.trainer import SiteTrainer
    from shared.config import ModelSpec
    from shared.privacy import SitePrivacy
    from simulations.phantoms import write_synthetic_federation

    data = write_synthetic_federation(tmp_path / "data", num_sites=1, cases_per_site=8,
                                      shape=(32, 32))[0]
    site = SiteConfig(data_path=data, state_dir=tmp_path / "state", device="cpu",
                      num_threads=1, val_fraction=0.25,
                      privacy=SitePrivacy(enabled=True, noise_multiplier=1.1, max_epsilon=50.0))
    spec = ModelSpec(channels=(8, 16), patch_size=(16, 16), adaptation="local-norm")
    return site, SiteTrainer(site, spec)


def _dp_round(site, trainer, server_round: int):  # type: ignore[no-untyped-def]
    from shared.config import TrainPlan
    from shared.privacy import PrivacyRequest, resolve_privacy

    return trainer.train(trainer.weights(), TrainPlan(server_round=server_round, local_steps=2,
                                                      batch_size=2),
                         resolve_privacy(site.privacy, PrivacyRequest()))


def test_a_dp_round_that_crashes_saving_its_ledger_leaves_nothing_of_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site, trainer = _dp_adaptation_trainer(tmp_path)
    state = site.state_dir
    _dp_round(site, trainer, 1)
    ledger_before = (state / LEDGER_FILE).read_bytes()
    layers_before = (state / LAYERS_FILE).read_bytes()
    local_before = trainer.local_weights()
    with crash_before_rename(monkeypatch, LEDGER_FILE), pytest.raises(PowerCutError):
        _dp_round(site, trainer, 2)
    # Neither file moved on, and nor did the layers in memory: steps the ledger does not
    # count can never reach a later update through the site's own layers.
    assert (state / LEDGER_FILE).read_bytes() == ledger_before
    assert (state / LAYERS_FILE).read_bytes() == layers_before
    for key, value in trainer.local_weights().items():
        np.testing.assert_array_equal(value, local_before[key])
    assert leftovers(state) == []
    # The site serves the next round as if round 2 had never started.
    result = _dp_round(site, trainer, 3)
    assert not result.refused
    assert [r["round"] for r in PrivacyLedger.load(state).rounds] == [1, 3]


def test_a_dp_round_that_crashes_saving_its_layers_has_already_counted_its_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site, trainer = _dp_adaptation_trainer(tmp_path)
    state = site.state_dir
    _dp_round(site, trainer, 1)
    layers_before = (state / LAYERS_FILE).read_bytes()
    with crash_before_rename(monkeypatch, LAYERS_FILE), pytest.raises(PowerCutError):
        _dp_round(site, trainer, 2)
    assert (state / LAYERS_FILE).read_bytes() == layers_before  # previous layers, loadable
    assert read_layers_ok(state)
    # The ledger was saved first: it counts round 2 (over-counting is the safe side).
    assert [r["round"] for r in PrivacyLedger.load(state).rounds] == [1, 2]


def read_layers_ok(state: Path) -> bool:
    from client.site_state import read_local_layers

    return read_local_layers(state) is not None


def test_a_coordinator_crash_saving_the_resume_state_resumes_from_the_round_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.federation import RunFolder, run_federation
    from server.resume import ResumeState
    from shared.checkpoint import Checkpoint
    from tests.conftest import FakeGrid
    from tests.test_federation import config, initial, site

    grid = FakeGrid({1: site("a", {"w": np.ones(2), "b": np.ones((1, 2))}, 1, 0.5),
                     2: site("b", {"w": np.full(2, 3.0), "b": np.ones((1, 2))}, 1, 0.5)})
    folder = RunFolder(tmp_path)
    saves: list[int] = []

    class CrashOnSecondResumeSave:
        def round_finished(self, record: object, num_rounds: int) -> None:
            saves.append(1)

    real_save = ResumeState.save

    def save(self: ResumeState, path: Path) -> None:
        if self.server_round == 2:
            with crash_before_rename(monkeypatch, path.name):
                real_save(self, path)
        real_save(self, path)

    monkeypatch.setattr(ResumeState, "save", save)
    with pytest.raises(PowerCutError):
        run_federation(grid, config(**{"num-server-rounds": 3}), initial(), folder,
                       CrashOnSecondResumeSave())  # type: ignore[arg-type]
    resumed = ResumeState.load(folder.path)
    assert resumed.server_round == 1 and [r.round for r in resumed.history.rounds] == [1]
    np.testing.assert_array_equal(resumed.weights["w"], [2.0, 2.0])
    # Round 2's checkpoint was written before the crash and is whole.
    assert Checkpoint.load(folder.checkpoint(2)).server_round == 2
    assert leftovers(folder.path) == [] and saves == [1]

