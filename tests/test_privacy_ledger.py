"""The privacy ledger never under-reports: strict parsing, a lock per round, site check."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from client.accounting import compute_epsilon
from client.config import SiteConfig
from client.privacy_ledger import FILE_NAME, FORMAT, LOCK_NAME, PrivacyLedger
from client.site_state import FILE_NAME as LAYERS_FILE
from client.site_state import save_local_layers
from client.trainer import SiteTrainer
from fedseg.cli import main
from shared.config import ModelSpec, TrainPlan
from shared.errors import DataError
from shared.privacy import PrivacyRequest, SitePrivacy, resolve_privacy
from simulations.phantoms import write_synthetic_federation

SPEC = ModelSpec(channels=(8, 16), patch_size=(16, 16))
THIRD = 1 / 3


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 cases, a quarter held out: 6 training cases, so batch 2 is Poisson rate 1/3.
    root = tmp_path_factory.mktemp("ledger-site")
    return write_synthetic_federation(root, num_sites=1, cases_per_site=8, shape=(32, 32))[0]


def dp_site(data: Path, state: Path) -> SiteConfig:
    return SiteConfig(data_path=data, state_dir=state, device="cpu", num_threads=1,
                      val_fraction=0.25,
                      privacy=SitePrivacy(enabled=True, noise_multiplier=1.1, max_epsilon=50.0))


def valid_ledger(state: Path) -> dict[str, Any]:
    """Write a two-round ledger through the real writer and return its JSON."""
    ledger = PrivacyLedger(state / FILE_NAME, calibrated_noise=1.3)
    ledger.record((1.1, THIRD, 3), 1, ledger.epsilon(1e-5, "rdp", (1.1, THIRD, 3)))
    ledger.record((1.3, 0.5, 2), 2, ledger.epsilon(1e-5, "rdp", (1.3, 0.5, 2)))
    raw: dict[str, Any] = json.loads((state / FILE_NAME).read_text())
    return raw


def assert_damaged(state: Path, *problem: str) -> str:
    """Load must stop with one line naming the file, "damaged ledger", the problem and fix."""
    with pytest.raises(DataError) as info:
        PrivacyLedger.load(state)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{state / FILE_NAME}: damaged ledger: "), message
    for words in problem:
        assert words in message, message
    assert "restore it from the site's backup; never delete it" in message
    return message


def test_valid_ledger_reads_back_exactly(tmp_path: Path) -> None:
    raw = valid_ledger(tmp_path)
    assert raw["format"] == FORMAT
    text = (tmp_path / FILE_NAME).read_text()
    ledger = PrivacyLedger.load(tmp_path)
    assert ledger.history == [(1.1, THIRD, 3), (1.3, 0.5, 2)]
    assert [r["round"] for r in ledger.rounds] == [1, 2]
    assert ledger.calibrated_noise == 1.3
    ledger.save()  # reading and writing again changes nothing
    assert (tmp_path / FILE_NAME).read_text() == text
    # A round without noise spends infinite epsilon; that is a true record, not damage.
    free = PrivacyLedger(tmp_path / FILE_NAME)
    free.record((0.0, 0.5, 1), 1, float("inf"))
    assert PrivacyLedger.load(tmp_path).rounds[0]["epsilon"] == float("inf")


@pytest.mark.faults
def test_negative_steps_stop_the_site_instead_of_being_dropped(tmp_path: Path) -> None:
    raw = valid_ledger(tmp_path)
    raw["history"][1][2] = raw["rounds"][1]["steps"] = -2
    (tmp_path / FILE_NAME).write_text(json.dumps(raw))
    assert_damaged(tmp_path, "history entry 2 has negative steps (-2)")


@pytest.mark.parametrize(("text", "problem"), [
    ("[]", "the top level is an empty list, not a JSON object"),
    ("[[1.1, 0.5, 3]]", "the top level is a list, not a JSON object"),
    ("null", "the top level is null, not a JSON object"),
    ("3", "the top level is a number (3), not a JSON object"),
    ('"ledger"', "the top level is a string ('ledger'), not a JSON object"),
    ("{not json", "not valid JSON (Expecting property name"),
    ("", "not valid JSON (Expecting value at line 1 column 1)"),
])
@pytest.mark.faults
def test_a_file_that_is_not_a_ledger_object_is_damaged(tmp_path: Path, text: str,
                                                         problem: str) -> None:
    (tmp_path / FILE_NAME).write_text(text)
    assert_damaged(tmp_path, problem)


def edit(raw: dict[str, Any], path: str, value: object) -> None:
    """Set ``raw`` at a slash-separated path; the sentinel ``DELETE`` removes the key."""
    *parents, last = path.split("/")
    node: Any = raw
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key: int | str = int(last) if isinstance(node, list) else last
    if value == "DELETE":
        del node[key]
    else:
        node[key] = value


@pytest.mark.parametrize(("edits", "problem"), [
    ({"format": "DELETE"}, "no 'format' key"),
    ({"format": "fedseg-privacy-ledger/2"}, "format is 'fedseg-privacy-ledger/2'"),
    ({"history": "DELETE"}, "no 'history' key"),
    ({"rounds": "DELETE"}, "no 'rounds' key"),
    ({"calibrated_noise": "DELETE"}, "no 'calibrated_noise' key"),
    ({"epsilon_spent": 0.0}, "unexpected key 'epsilon_spent'"),
    ({"history": None}, "'history' is null, not a list"),
    ({"history/0": {"n": 1.1}}, "history entry 1 is an object, not [noise, sample rate, steps]"),
    ({"history/0": [1.1, 0.5]}, "history entry 1 has 2 items"),
    ({"history/0/0": -0.5, "rounds/0/noise_multiplier": -0.5},
     "history entry 1 has noise multiplier -0.5, must be finite and at least 0"),
    ({"history/0/0": float("nan")}, "history entry 1 has noise multiplier nan"),
    ({"history/0/0": float("inf")}, "history entry 1 has noise multiplier inf"),
    ({"history/0/0": "1.1"}, "history entry 1 noise multiplier is a string ('1.1'), not a number"),
    ({"history/0/0": True}, "history entry 1 noise multiplier is true, not a number"),
    ({"history/1/1": 0}, "history entry 2 has sample rate 0.0, must be in (0, 1]"),
    ({"history/1/1": 1.5}, "history entry 2 has sample rate 1.5, must be in (0, 1]"),
    ({"history/1/1": float("nan")}, "history entry 2 has sample rate nan"),
    ({"history/0/2": 2.5}, "history entry 1 steps is a number (2.5), not a whole number"),
    ({"history/0/2": None}, "history entry 1 steps is null, not a whole number"),
    ({"rounds": {}}, "'rounds' is an object, not a list"),
    ({"rounds/1": "DELETE"}, "2 history entries but 1 rounds"),
    ({"rounds/1": [2]}, "rounds entry 2 is a list, not a JSON object"),
    ({"rounds/1/epsilon": "DELETE"}, "rounds entry 2 has keys"),
    ({"rounds/1/round": -1}, "rounds entry 2 has round -1"),
    ({"rounds/1/epsilon": float("nan")}, "rounds entry 2 has epsilon nan"),
    ({"rounds/0/steps": 30}, "rounds entry 1 records [1.1, 0.3333333333333333, 30] but "
                             "history entry 1 is [1.1, 0.3333333333333333, 3]"),
    ({"calibrated_noise": 0}, "'calibrated_noise' is 0.0, must be finite and above 0"),
    ({"calibrated_noise": "high"}, "'calibrated_noise' is a string ('high'), not a number"),
])
@pytest.mark.faults
def test_every_malformed_entry_is_damage(tmp_path: Path, edits: dict[str, object],
                                         problem: str) -> None:
    raw = valid_ledger(tmp_path)
    for path, value in edits.items():
        edit(raw, path, value)
    (tmp_path / FILE_NAME).write_text(json.dumps(raw))
    assert_damaged(tmp_path, problem)


@pytest.mark.faults
def test_a_directory_in_place_of_the_ledger_is_damage(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).mkdir()
    assert_damaged(tmp_path, "is a directory, not a file")


@pytest.mark.faults
def test_a_dangling_link_is_damage_not_a_new_site(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).symlink_to(tmp_path / "backup" / FILE_NAME)
    assert_damaged(tmp_path, "is a symbolic link to a missing file")


@pytest.mark.faults
def test_unreadable_or_binary_ledger_is_damage(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"\xff\xfe{}")
    assert_damaged(tmp_path, "is not UTF-8 text")

    def refuse(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    # Tests may run as root, for whom chmod 000 would not stop the read.
    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(DataError, match=r"damaged ledger: cannot be read \(Permission denied\); "
                                        r"give the site's user read and write access"):
        PrivacyLedger.load(tmp_path)


@pytest.mark.faults
def test_dp_round_on_a_damaged_ledger_stops_and_leaves_it_alone(site_data: Path,
                                                                tmp_path: Path) -> None:
    raw = valid_ledger(tmp_path)
    raw["history"][0][2] = raw["rounds"][0]["steps"] = -3
    text = json.dumps(raw)
    (tmp_path / FILE_NAME).write_text(text)
    site = dp_site(site_data, tmp_path)
    trainer = SiteTrainer(site, SPEC)
    with pytest.raises(DataError, match="damaged ledger: history entry 1 has negative steps"):
        trainer.train(trainer.weights(), TrainPlan(local_steps=1, batch_size=2),
                      resolve_privacy(site.privacy, PrivacyRequest()))
    assert (tmp_path / FILE_NAME).read_text() == text


def _dp_round_in_process(data: str, state: str, server_round: int,
                         barrier: Any, results: Any) -> None:
    """One site round in a spawned process, with a slow save to widen any race."""
    record = PrivacyLedger.record

    def slow_record(self: PrivacyLedger, step: Any, rnd: int, epsilon: float) -> None:
        # Without the lock the other round has long read the old ledger by now.
        time.sleep(1.0)
        record(self, step, rnd, epsilon)

    PrivacyLedger.record = slow_record  # type: ignore[method-assign]
    site = dp_site(Path(data), Path(state))
    trainer = SiteTrainer(site, SPEC)
    privacy = resolve_privacy(site.privacy, PrivacyRequest())
    start = trainer.weights()
    barrier.wait(timeout=300)
    result = trainer.train(start, TrainPlan(server_round=server_round, local_steps=3,
                                            batch_size=2), privacy)
    results.put((server_round, result.epsilon, result.steps))


@pytest.mark.faults
def test_two_rounds_at_once_both_count(site_data: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    workers = [ctx.Process(target=_dp_round_in_process,
                           args=(str(site_data), str(tmp_path), rnd, barrier, results))
               for rnd in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]
    reported = sorted(results.get(timeout=5)[1] for _ in workers)
    ledger = PrivacyLedger.load(tmp_path)
    assert sorted(r["round"] for r in ledger.rounds) == [1, 2]
    assert ledger.history == [(1.1, THIRD, 3), (1.1, THIRD, 3)]
    opacus = RDPAccountant()
    for _ in range(6):
        opacus.step(noise_multiplier=1.1, sample_rate=THIRD)
    both = opacus.get_epsilon(delta=1e-5)
    assert ledger.epsilon(1e-5, "rdp") == pytest.approx(both, rel=1e-12)
    # The round that waited saw the first round's steps: it reports the total.
    assert reported == pytest.approx([compute_epsilon([(1.1, THIRD, 3)], 1e-5, "rdp"), both],
                                     rel=1e-12)


@pytest.mark.faults
def test_threads_of_one_process_also_wait_for_each_other(tmp_path: Path) -> None:
    def one_round(server_round: int) -> None:
        with PrivacyLedger.locked(tmp_path) as ledger:
            step = (1.0, 0.5, server_round)
            time.sleep(0.3)
            ledger.record(step, server_round, ledger.epsilon(1e-5, "rdp", step))

    threads = [threading.Thread(target=one_round, args=(r,)) for r in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ledger = PrivacyLedger.load(tmp_path)
    assert sorted(k for _, _, k in ledger.history) == [1, 2, 3]
    # Each round saw all earlier ones: the last saved epsilon covers every step.
    assert ledger.rounds[-1]["epsilon"] == pytest.approx(ledger.epsilon(1e-5, "rdp"))


@pytest.mark.faults
def test_a_held_lock_times_out_with_one_line_and_is_freed_by_errors(tmp_path: Path) -> None:
    with PrivacyLedger.locked(tmp_path):
        started = time.monotonic()
        with pytest.raises(DataError) as info, PrivacyLedger.locked(tmp_path, timeout=0.3):
            pytest.fail("a second round entered while the first held the lock")
        assert time.monotonic() - started >= 0.3
    assert str(info.value) == (
        f"{tmp_path / LOCK_NAME}: privacy ledger still locked by another round after 0.3 s; "
        "wait for that round to finish, or stop the other process that uses this state-dir "
        "(one SuperNode per state-dir)")
    # A round that fails inside the lock must not wedge the site.
    with pytest.raises(RuntimeError), PrivacyLedger.locked(tmp_path):
        raise RuntimeError("training failed")
    with PrivacyLedger.locked(tmp_path, timeout=0.1) as ledger:
        assert ledger.history == []


def site_config(tmp_path: Path, data: Path, state: Path) -> Path:
    config = tmp_path / "site.toml"
    config.write_text(f'data-path = "{data}"\nstate-dir = "{state}"\ndp-enabled = true\n'
                      'dp-noise-multiplier = 1.1\n')
    return config


def damage_negative_steps(state: Path) -> None:
    raw = valid_ledger(state)
    raw["history"][1][2] = raw["rounds"][1]["steps"] = -2
    (state / FILE_NAME).write_text(json.dumps(raw))


@pytest.mark.parametrize(("damage", "problem"), [
    (damage_negative_steps, "damaged ledger: history entry 2 has negative steps (-2)"),
    (lambda s: (s / FILE_NAME).write_text("[]"), "damaged ledger: the top level is an empty"),
    (lambda s: (s / FILE_NAME).write_text("null"), "damaged ledger: the top level is null"),
    (lambda s: (s / FILE_NAME).mkdir(), "damaged ledger: is a directory"),
    (lambda s: (s / FILE_NAME).write_text("{"), "damaged ledger: not valid JSON"),
    (lambda s: (s / LAYERS_FILE).write_bytes(b"not torch"), "damaged local layers: cannot be"),
    (lambda s: (s / LAYERS_FILE).mkdir(), "damaged local layers: not a file"),
])
@pytest.mark.faults
def test_site_check_config_stops_on_a_damaged_state_dir(
        site_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        damage: Any, problem: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    damage(state)
    code = main(["site", "check", "--config", str(site_config(tmp_path, site_data, state))])
    out, err = capsys.readouterr()
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fedseg: error: {state}/")
    assert problem in lines[0]
    assert "Traceback" not in err
    assert "8 cases, 0 with problems" in out  # the data was still checked


def test_site_check_config_reports_a_healthy_or_new_state_dir(
        site_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    config = site_config(tmp_path, site_data, state)
    assert main(["site", "check", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "privacy ledger: no DP steps yet" in out and "local layers: none yet" in out
    assert err == "" and not state.exists()  # checking never creates the state folder

    state.mkdir()
    valid_ledger(state)
    save_local_layers(state, "adapter", {"adapter.weight": np.ones((1, 1), np.float32)})
    assert main(["site", "check", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    spent = compute_epsilon([(1.1, THIRD, 3), (1.3, 0.5, 2)], 1e-5, "rdp")
    assert (f"privacy ledger ok: 2 rounds, 5 steps, epsilon {spent:.3f} at delta 1e-05 (rdp)"
            in out)
    assert "local layers ok: adaptation 'adapter', 1 tensors" in out and err == ""
