"""Real Flower deployment on 127.0.0.1: SuperLink, SuperNodes and ``flwr run``.

Everything is started through the operator scripts in ``deploy/bin`` with
credentials made by ``fedseg coordinator certs`` and ``fedseg site keygen``, so
these tests exercise what hospital IT and the coordinator actually run. Runs start
as the coordinator starts them: the app signed with ``fedseg coordinator sign-app``,
served by ``fedseg-app-index`` and launched as ``flwr run @fedseg/fedseg==VERSION``,
with every site trusting the coordinator's key. Every process runs in its own
session and is killed at teardown; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from server.history import MetricsHistory
from shared.run_files import RunFiles
from simulations.phantoms import write_synthetic_federation
from tests.conftest import REPO

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.name != "posix", reason="the deploy scripts are bash"),
]

BIN = Path(sys.executable).parent
SITES = ("site-a", "site-b", "site-c")
# Small, quick model: the point here is the deployment, not the Dice.
FAST_RUN = {
    "channels": "8,16,32", "patch-size": "48,48", "local-steps": 3, "batch-size": 4,
    "node-wait-timeout": 60.0,
}


def app_spec() -> str:
    """``@publisher/name==version`` of this repository's app, as ``flwr run`` takes it."""
    with (REPO / "pyproject.toml").open("rb") as fh:
        meta = tomllib.load(fh)
    return f"@{meta['tool']['flwr']['app']['publisher']}/{meta['project']['name']}" \
           f"=={meta['project']['version']}"


#: Ports tried for the test servers: below Linux's ephemeral range (32768-60999), where the
#: kernel never hands out a client socket's port. A port the kernel chose with bind(0) comes
#: from that range, and once released it can become some connection's local port before the
#: server that was meant to listen on it binds (seen as "address already in use").
TEST_PORTS = range(20000, 32768)


def free_port() -> int:
    for port in random.sample(TEST_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port among 200 tried in {TEST_PORTS}")


def wait_until(what: str, check: Callable[[], bool], timeout: float,
               log: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log()}")
        time.sleep(0.5)


@dataclass
class Process:
    """A daemon started in its own session, so it and its children die together."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.name} log ---\n" + "\n".join(self.log().splitlines()[-lines:])

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=15)
        # Children (superexec, app processes) may outlive the leader.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait(timeout=30)


def start(name: str, script: str, env: dict[str, str], logs: Path) -> Process:
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as fh:
        popen = subprocess.Popen([str(REPO / "deploy" / "bin" / script)], env=env,
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return Process(name, popen, log_path)


@dataclass
class Federation:
    root: Path
    port: int
    creds: Path
    keys: Path
    env: dict[str, str]
    superlink_env: dict[str, str]
    superlink: Process
    trusted: Path
    fleet_address: str = ""
    nodes: dict[str, Process] = field(default_factory=dict)
    helpers: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fleet_address = self.fleet_address or f"127.0.0.1:{self.port}"

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout)

    def flwr_json(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        result = self.flwr(*args, "--format", "json", timeout=timeout)
        try:
            return dict(json.loads(result.stdout))
        except json.JSONDecodeError:
            raise AssertionError(f"flwr {' '.join(args)}: {result.stdout}{result.stderr}"
                                 ) from None

    def site_env(self, key: Path, site: str, ca: Path | None) -> dict[str, str]:
        env = {**self.env, "FEDSEG_SUPERLINK": self.fleet_address,
               "FEDSEG_TRUSTED_ENTITIES": str(self.trusted),
               "FEDSEG_NODE_KEY": str(key), "FEDSEG_SITE_CONFIG": str(self.root / f"{site}.toml"),
               "FEDSEG_CLIENTAPPIO_PORT": str(free_port()), "FEDSEG_MAX_RETRIES": "3",
               "FEDSEG_MAX_WAIT_TIME": "30"}
        env["FEDSEG_CA_CERT"] = str(ca) if ca is not None else ""
        return env

    def start_site(self, site: str, key_name: str | None = None,
                   ca: Path | None = None) -> Process:
        key = self.keys / f"{key_name or site}.key"
        return start(f"supernode-{key_name or site}", "fedseg-site",
                     self.site_env(key, site, ca or self.creds / "ca.crt"), self.root / "logs")

    def online_nodes(self) -> list[dict[str, Any]]:
        out = self.flwr_json("supernode", "ls")
        return [n for n in out.get("nodes", []) if n.get("status") == "online"]

    def launch(self, run_config: dict[str, Any], app: str | None = None) -> int:
        """Start a run of ``app`` (default: the signed app in the coordinator's index)."""
        text = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                        for k, v in run_config.items())
        out = self.flwr_json("run", app or app_spec(), "--run-config", text)
        assert out.get("success"), out
        return int(out["run-id"])

    def status(self, run_id: int) -> str:
        out = self.flwr_json("ls", "--run-id", str(run_id))
        return str(out["runs"][0]["status"]) if out.get("runs") else "unknown"

    def wait_finished(self, run_id: int, timeout: float) -> str:
        wait_until(f"run {run_id} to finish", lambda: self.status(run_id).startswith("finished"),
                   timeout, lambda: self.logs(run_id))
        return self.status(run_id)

    def logs(self, run_id: int) -> str:
        shown = self.flwr("log", str(run_id), "--show", timeout=60)
        parts = [f"--- flwr log {run_id} ---\n{shown.stdout[-6000:]}{shown.stderr[-2000:]}",
                 self.superlink.tail()]
        parts += [p.tail(15) for p in self.nodes.values()]
        return "\n".join(parts)


def kill_strays(flwr_home: Path) -> None:
    """Kill what Flower detached into sessions of its own (SuperExec, app processes).

    Every process of this federation inherited ``FLWR_HOME=<flwr_home>``; nothing
    else on the machine has it.
    """
    marker = f"FLWR_HOME={flwr_home}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def wait_for_superlink(superlink: Process) -> None:
    wait_until("the SuperLink to listen", lambda: "Uvicorn running on https" in superlink.log(),
               90, superlink.tail)


def _fedseg(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "fedseg", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def coordinator_signing(root: Path, creds: Path, index: Path) -> Path:
    """Make the coordinator's signing key and sign this repository's app into ``index``;
    return the trusted-entities file ``signing-key`` wrote for the sites."""
    _fedseg("coordinator", "signing-key", "--out", str(creds), cwd=root)
    _fedseg("coordinator", "sign-app", str(REPO), "--key", str(creds / "fedseg-coordinator.key"),
            "--index", str(index), cwd=root)
    return creds / "fedseg-coordinator.trusted-entities.yaml"


def start_app_index(env: dict[str, str], index: Path, logs: Path) -> tuple[Process, str]:
    """Start deploy/bin/fedseg-app-index on a free loopback port; return it and host:port."""
    address = f"127.0.0.1:{free_port()}"
    proc = start("app-index", "fedseg-app-index",
                 {**env, "FEDSEG_APP_INDEX": address, "FEDSEG_APP_INDEX_DIR": str(index)}, logs)
    wait_until("the app index to listen", lambda: "fedseg app index:" in proc.log(), 60,
               proc.tail)
    return proc, address


def require_tools() -> None:
    """Skip, naming it, when a Flower or fedseg command is missing beside the interpreter."""
    for tool in ("flwr", "flower-superlink", "flower-supernode", "flwr-clientapp", "fedseg"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} is not installed beside {sys.executable}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    require_tools()
    root = tmp_path_factory.mktemp("deploy")
    (root / "logs").mkdir()
    creds, keys = root / "coordinator-credentials", root / "site-keys"
    # Only a public-looking name: the loopback names the SuperLink needs for its own
    # SuperExec (and these tests use to connect) must be added by `certs` itself.
    _fedseg("coordinator", "certs", "--out", str(creds), "--host", "fl.coordinator.test",
            cwd=root)
    for name in (*SITES, "rogue"):
        _fedseg("site", "keygen", "--out", str(keys), "--name", name, cwd=root)
    folders = write_synthetic_federation(root / "data", num_sites=3, cases_per_site=8,
                                         shape=(48, 48), seed=3)
    assert [f.name for f in folders] == list(SITES)
    for folder in folders:
        (root / f"{folder.name}.toml").write_text(
            f'data-path = "{folder}"\nstate-dir = "{root / "state" / folder.name}"\n'
            f'site-name = "{folder.name}"\ndevice = "cpu"\nnum-threads = 1\n')

    port = free_port()
    flwr_home = root / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "fedseg"\n\n[superlink.fedseg]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{creds / "ca.crt"}"\n')
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FEDSEG_BIN": str(BIN), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    trusted = coordinator_signing(root, creds, root / "coordinator" / "apps")
    app_index, index_address = start_app_index(env, root / "coordinator" / "apps", root / "logs")
    superlink_env = {**env, "FEDSEG_CREDENTIALS": str(creds),
                     "FEDSEG_STATE_DIR": str(root / "coordinator"),
                     "FEDSEG_HOST": "127.0.0.1", "FEDSEG_PORT": str(port),
                     "FEDSEG_APP_INDEX": index_address}
    superlink = start("superlink", "fedseg-superlink", superlink_env, root / "logs")
    fed = Federation(root, port, creds, keys, env, superlink_env, superlink, trusted,
                     helpers=[app_index])
    try:
        wait_for_superlink(superlink)
        reg = subprocess.run(
            [str(REPO / "deploy" / "bin" / "fedseg-register-sites"),
             *(str(keys / f"{s}.pub") for s in SITES)],
            env={**env, "FEDSEG_SUPERLINK": f"127.0.0.1:{port}",
                 "FEDSEG_CA_CERT": str(creds / "ca.crt")},
            capture_output=True, text=True, timeout=120)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        for site in SITES:
            fed.nodes[site] = fed.start_site(site)
        wait_until("three SuperNodes online", lambda: len(fed.online_nodes()) == 3, 90,
                   lambda: "\n".join(p.tail() for p in fed.nodes.values()))
        yield fed
    finally:
        for proc in [*fed.nodes.values(), fed.superlink, *fed.helpers]:
            proc.stop()
        kill_strays(flwr_home)


def run_dir(fed: Federation, run_id: int) -> Path:
    return fed.root / "coordinator" / "runs" / f"run-{run_id}"


def test_two_rounds_with_three_authenticated_sites(federation: Federation) -> None:
    fed = federation
    run_id = fed.launch({**FAST_RUN, "num-server-rounds": 2, "min-available-nodes": 3,
                         "min-train-nodes": 3, "min-evaluate-nodes": 3, "round-timeout": 300.0})
    status = fed.wait_finished(run_id, timeout=600)
    assert status == "finished:completed", fed.logs(run_id)

    # The ServerApp runs in the coordinator's state folder, so the run config's default
    # output-dir puts the run folder where the coordinator's guide says it is.
    folder = run_dir(fed, run_id)
    history = MetricsHistory.read(RunFiles(folder).metrics_json)
    assert [r.round for r in history.rounds] == [1, 2]
    for record in history.rounds:
        assert record.aggregated
        assert sorted(s.site for s in record.sites) == list(SITES)
        for site in record.sites:
            assert site.error is None, site
            assert site.num_train_cases and site.train_steps == 3
            assert site.val_dice is not None and 0.0 <= site.val_dice <= 1.0
    assert RunFiles(folder).final_model.is_file()
    assert RunFiles(folder).checkpoint(2).is_file()
    assert "site-a" in RunFiles(folder).metrics_csv.read_text()
    # The coordinator watches through `flwr log`; the per-site lines come from our ServerApp.
    shown = fed.flwr("log", str(run_id), "--show", timeout=60).stdout
    assert "round 2/2" in shown and "site-c" in shown, shown[-3000:]


def test_coordinator_can_stop_a_run(federation: Federation) -> None:
    fed = federation
    run_id = fed.launch({**FAST_RUN, "num-server-rounds": 50, "min-available-nodes": 3,
                         "min-train-nodes": 3, "min-evaluate-nodes": 3, "round-timeout": 300.0})
    wait_until(f"run {run_id} to start", lambda: fed.status(run_id) == "running", 120,
               lambda: fed.logs(run_id))
    stopped = fed.flwr_json("stop", str(run_id))
    assert stopped.get("success"), stopped
    assert fed.wait_finished(run_id, timeout=120) == "finished:stopped"
    # The sites are free again for the next run.
    wait_until("three SuperNodes online", lambda: len(fed.online_nodes()) == 3, 60)


def test_unregistered_key_is_refused(federation: Federation) -> None:
    fed = federation
    rogue = fed.start_site("site-a", key_name="rogue")
    try:
        rogue.popen.wait(timeout=120)
    finally:
        rogue.stop()
    log = rogue.log()
    assert rogue.popen.returncode != 0, log
    assert "Failed to activate SuperNode" in log, log
    names = {n.get("node-id") for n in fed.online_nodes()}
    assert len(names) == 3, "the rogue node must never come online"


def test_client_without_the_ca_certificate_cannot_connect(federation: Federation) -> None:
    fed = federation
    # A SuperNode that trusts only the system's CAs rejects our private CA's certificate.
    env = fed.site_env(fed.keys / "site-a.key", "site-a", None)
    env["FEDSEG_EXTRA_ARGS"] = ""
    script = REPO / "deploy" / "bin" / "fedseg-site"
    refused = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "FEDSEG_CA_CERT" in refused.stderr, refused.stderr

    log_path = fed.root / "logs" / "supernode-no-ca.log"
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(
            [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{fed.port}",
             "--auth-supernode-private-key", str(fed.keys / "site-a.key"),
             "--node-config", str(fed.root / "site-a.toml"), "--max-retries", "1",
             "--max-wait-time", "20", "--port", str(free_port())],
            env=fed.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    no_ca = Process("supernode-no-ca", proc, log_path)
    try:
        proc.wait(timeout=120)
    finally:
        no_ca.stop()
    assert proc.returncode != 0, no_ca.log()
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca.log(), no_ca.log()
    # The coordinator's CLI without the CA is refused the same way.
    home = fed.root / "flwr-home-no-ca"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedseg"\n\n[superlink.fedseg]\n'
        f'address = "127.0.0.1:{fed.port}"\n')
    cli = subprocess.run([str(BIN / "flwr"), "ls", "--format", "json"],
                         env={**fed.env, "FLWR_HOME": str(home)}, capture_output=True,
                         text=True, timeout=120)
    assert '"success": false' in cli.stdout, cli.stdout + cli.stderr
    assert len(fed.online_nodes()) == 3


@pytest.mark.faults
def test_run_completes_when_a_site_dies_mid_run(federation: Federation) -> None:
    fed = federation
    # Generous for a loaded 2-core CI machine; a dead site is declared unavailable by
    # the SuperLink after two missed 30 s heartbeats, well inside this.
    round_timeout = 120.0
    rounds = 3
    run_id = fed.launch({**FAST_RUN, "num-server-rounds": rounds, "min-available-nodes": 2,
                         "min-train-nodes": 2, "min-evaluate-nodes": 2,
                         "round-timeout": round_timeout})
    folder = run_dir(fed, run_id)
    # A round's training may be sent again (round-retries, 2 by default) when a loaded
    # machine's sites miss the deadline, so a round takes up to 3 + 1 phase deadlines.
    per_round = 4 * round_timeout
    wait_until("round 1 to finish", lambda: RunFiles(folder).checkpoint(1).exists(),
               per_round + 60, lambda: fed.logs(run_id))
    fed.nodes["site-c"].kill()
    killed_at = time.monotonic()

    budget = (rounds - 1) * per_round + 120
    status = fed.wait_finished(run_id, timeout=budget)
    assert status == "finished:completed", fed.logs(run_id)
    assert time.monotonic() - killed_at < budget

    history = MetricsHistory.read(RunFiles(folder).metrics_json)
    assert [r.round for r in history.rounds] == [1, 2, 3]
    assert sorted(s.site for s in history.rounds[0].sites) == list(SITES)
    for record in history.rounds[1:]:
        assert record.aggregated, record
        # Flower polls for replies every few seconds, so allow a little past the deadline.
        assert record.train_seconds is not None and record.train_seconds <= round_timeout + 15
        assert record.evaluate_seconds is not None
        assert record.evaluate_seconds <= round_timeout + 15
        by_site = {s.site: s for s in record.sites}
        for alive in ("site-a", "site-b"):
            assert by_site[alive].error is None and by_site[alive].val_dice is not None
    # The dead site's missing reply is recorded against it by name, not silently dropped.
    dead = {s.site: s for s in history.rounds[1].sites}["site-c"]
    assert dead.error and dead.val_dice is None, dead
    assert not any(s.site.startswith("node-") for r in history.rounds for s in r.sites)
    assert RunFiles(folder).final_model.is_file()


@pytest.mark.faults
def test_superlink_restart_keeps_runs_and_registrations(federation: Federation) -> None:
    fed = federation
    before = {r["run-id"]: r["status"] for r in fed.flwr_json("ls")["runs"]}
    assert before and all(status.startswith("finished") for status in before.values())
    fed.superlink.stop()
    fed.superlink = start("superlink-restarted", "fedseg-superlink", fed.superlink_env,
                          fed.root / "logs")
    wait_for_superlink(fed.superlink)
    after = {r["run-id"]: r["status"] for r in fed.flwr_json("ls")["runs"]}
    assert after == before
    registered = fed.flwr_json("supernode", "ls")["nodes"]
    assert len(registered) == 3, registered
