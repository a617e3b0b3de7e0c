"""Only signed apps run at a site, and hospitals reach only the Fleet API: on 127.0.0.1.

A real SuperLink (loopback only, TLS, SuperNode authentication), the coordinator's
app index, nginx with ``deploy/proxy/fedseg-fleet.conf`` in front, and one hospital
SuperNode that connects through nginx and trusts only the coordinator's key, all
started through the ``deploy/bin`` scripts. Without an nginx binary the site connects
to the SuperLink directly and the proxy tests skip, saying so.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.history import MetricsHistory
from shared.run_files import RunFiles
from simulations.phantoms import write_synthetic_federation
from tests.conftest import REPO
from tests.test_deployment import (
    BIN,
    FAST_RUN,
    Federation,
    Process,
    _fedseg,
    app_spec,
    coordinator_signing,
    free_port,
    kill_strays,
    require_tools,
    start,
    start_app_index,
    wait_for_superlink,
    wait_until,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.name != "posix", reason="the deploy scripts are bash"),
]

PROXY_CONF = REPO / "deploy" / "proxy" / "fedseg-fleet.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
NO_NGINX = "no nginx binary (apt-get install nginx-light, or nginx) to run the Fleet proxy"
ONE_ROUND = {**FAST_RUN, "local-steps": 1, "num-server-rounds": 1, "min-available-nodes": 1,
             "min-train-nodes": 1, "min-evaluate-nodes": 1, "round-timeout": 120.0}
# What the SuperNode logs when it refuses a run's app, and when it starts a run's code.
NOT_SIGNED = "App verification is not supported by the connected SuperLink"
BAD_SIGNATURE = "FAB verification failed"
STARTS_APP = "Start `flwr-clientapp` process"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def render_proxy_conf(text: str, creds: Path, listen: int, upstream: int, prefix: Path) -> str:
    """The shipped server block inside a minimal nginx.conf for an unprivileged nginx."""
    for old, new in (("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream};"),
                     ("listen 9092 ssl;", f"listen 127.0.0.1:{listen} ssl;"),
                     ("/etc/fedseg/credentials/", f"{creds}/")):
        assert old in text, f"{PROXY_CONF} no longer has {old!r}; update this test"
        text = text.replace(old, new)
    temp = prefix / "temp"
    temps = "\n".join(f"    {kind}_temp_path {temp / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n"
            f"error_log {prefix / 'error.log'} info;\nevents {{ worker_connections 64; }}\n"
            f"http {{\n    access_log {prefix / 'access.log'};\n{temps}\n{text}\n}}\n")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Proxy:
    process: Process
    port: int
    prefix: Path

    def access_log(self) -> str:
        path = self.prefix / "access.log"
        return path.read_text() if path.exists() else ""


def start_proxy(root: Path, creds: Path, upstream: int) -> Proxy:
    assert NGINX is not None
    prefix = root / "nginx"
    (prefix / "temp").mkdir(parents=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render_proxy_conf(PROXY_CONF.read_text(), creds, port, upstream, prefix))
    log_path = root / "logs" / "nginx.log"
    with log_path.open("wb") as fh:
        popen = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf),
                                  "-e", str(prefix / "error.log")],
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    proc = Process("nginx", popen, log_path)
    wait_until("nginx to listen", lambda: listening(port) or popen.poll() is not None, 30)
    assert popen.poll() is None, (prefix / "error.log").read_text() + proc.log()
    return Proxy(proc, port, prefix)


@dataclass
class Trust:
    fed: Federation
    proxy: Proxy | None
    site_home: Path
    rogue_key: Path

    @property
    def site(self) -> Process:
        return self.fed.nodes["site-a"]

    def site_log(self) -> str:
        return ANSI.sub("", self.site.log())

    def run_and_watch_site(self, app: str | None) -> tuple[int, str, str]:
        """Launch one round of ``app``; return its id, final status and the site's log of it."""
        before = len(self.site_log())
        run_id = self.fed.launch(ONE_ROUND, app)
        # A deadline, not a timing check: a round starts three ClientApp processes, each
        # importing torch, which is slow on a loaded 2-core machine.
        status = self.fed.wait_finished(run_id, timeout=480)
        return run_id, status, self.site_log()[before:]


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trust]:
    require_tools()
    root = tmp_path_factory.mktemp("trust")
    (root / "logs").mkdir()
    creds, keys = root / "coordinator-credentials", root / "site-keys"
    _fedseg("coordinator", "certs", "--out", str(creds), "--host", "fl.coordinator.test",
            cwd=root)
    _fedseg("site", "keygen", "--out", str(keys), "--name", "site-a", cwd=root)
    # Someone else's Ed25519 key: a valid key, just not one the site trusts.
    _fedseg("coordinator", "signing-key", "--out", str(root / "rogue"), "--name", "rogue",
            cwd=root)
    (folder,) = write_synthetic_federation(root / "data", num_sites=1, cases_per_site=8,
                                           shape=(48, 48), seed=5)
    (root / "site-a.toml").write_text(
        f'data-path = "{folder}"\nstate-dir = "{root / "state"}"\n'
        'site-name = "site-a"\ndevice = "cpu"\nnum-threads = 1\n')

    port = free_port()
    flwr_home, site_home = root / "flwr-home", root / "site-flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "fedseg"\n\n[superlink.fedseg]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{creds / "ca.crt"}"\n')
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FEDSEG_BIN": str(BIN), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    index = root / "coordinator" / "apps"
    trusted = coordinator_signing(root, creds, index)
    app_index, index_address = start_app_index(env, index, root / "logs")
    superlink_env = {**env, "FEDSEG_CREDENTIALS": str(creds),
                     "FEDSEG_STATE_DIR": str(root / "coordinator"), "FEDSEG_PORT": str(port),
                     "FEDSEG_APP_INDEX": index_address}
    superlink = start("superlink", "fedseg-superlink", superlink_env, root / "logs")
    fed = Federation(root, port, creds, keys, env, superlink_env, superlink, trusted,
                     helpers=[app_index])
    proxy: Proxy | None = None
    try:
        wait_for_superlink(superlink)
        if NGINX is not None:
            proxy = start_proxy(root, creds, port)
            fed.helpers.append(proxy.process)
            fed.fleet_address = f"127.0.0.1:{proxy.port}"
        reg = subprocess.run(
            [str(REPO / "deploy" / "bin" / "fedseg-register-sites"), str(keys / "site-a.pub")],
            env={**env, "FEDSEG_SUPERLINK": f"127.0.0.1:{port}",
                 "FEDSEG_CA_CERT": str(creds / "ca.crt")},
            capture_output=True, text=True, timeout=120)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        # The site keeps its own Flower home: what it installs is its own.
        site_env = {**fed.site_env(keys / "site-a.key", "site-a", creds / "ca.crt"),
                    "FLWR_HOME": str(site_home)}
        fed.nodes["site-a"] = start("supernode-site-a", "fedseg-site", site_env, root / "logs")
        wait_until("the site online", lambda: len(fed.online_nodes()) == 1, 90,
                   fed.nodes["site-a"].tail)
        yield Trust(fed, proxy, site_home, root / "rogue" / "rogue.key")
    finally:
        for proc in [*fed.nodes.values(), fed.superlink, *fed.helpers]:
            proc.stop()
        kill_strays(flwr_home)
        kill_strays(site_home)


def test_signed_app_runs_at_the_site_through_the_proxy(trust: Trust) -> None:
    run_id, status, site_log = trust.run_and_watch_site(None)
    assert status == "finished:completed", trust.fed.logs(run_id)
    assert STARTS_APP in site_log, site_log[-3000:]
    assert NOT_SIGNED not in site_log and BAD_SIGNATURE not in site_log
    folder = trust.fed.root / "coordinator" / "runs" / f"run-{run_id}"
    (record,) = MetricsHistory.read(RunFiles(folder).metrics_json).rounds
    assert record.aggregated and [s.site for s in record.sites] == ["site-a"]
    assert record.sites[0].error is None and record.sites[0].train_steps == 1
    if trust.proxy is not None:
        # Every Fleet call of the run went through nginx, and only Fleet calls did.
        paths = re.findall(r'"(\w+) (\S+) HTTP', trust.proxy.access_log())
        assert {"/v1/fleet/pull-messages", "/v1/fleet/get-fab",
                "/v1/fleet/push-messages"} <= {p for _, p in paths}, paths[-20:]
        assert all(method == "POST" and p.startswith("/v1/fleet/") for method, p in paths)


def test_unsigned_app_is_refused_before_any_of_it_runs(trust: Trust) -> None:
    # `flwr run DIR` uploads the folder's FAB; Flower's SuperLink attaches no signature.
    run_id, status, site_log = trust.run_and_watch_site(str(REPO))
    assert status == "finished:failed", trust.fed.logs(run_id)
    assert NOT_SIGNED in site_log, site_log[-3000:]
    assert STARTS_APP not in site_log, site_log[-3000:]


def test_app_signed_by_an_untrusted_key_is_refused(trust: Trust) -> None:
    index = trust.fed.root / "coordinator" / "apps"
    good_key = trust.fed.creds / "fedseg-coordinator.key"
    try:
        # The rogue key signs once under the trusted key's id (replacing its signature)
        # and once under its own id: the index then offers two signatures, neither good.
        for key_id in ("fedseg-coordinator", "rogue"):
            _fedseg("coordinator", "sign-app", str(REPO), "--key", str(trust.rogue_key),
                    "--key-id", key_id, "--index", str(index), cwd=trust.fed.root)
        run_id, status, site_log = trust.run_and_watch_site(None)
    finally:
        (index / "fedseg" / "fedseg").joinpath(
            app_spec().split("==")[1] + ".json").unlink(missing_ok=True)
        _fedseg("coordinator", "sign-app", str(REPO), "--key", str(good_key),
                "--index", str(index), cwd=trust.fed.root)
    assert status == "finished:failed", trust.fed.logs(run_id)
    assert BAD_SIGNATURE in site_log, site_log[-3000:]
    assert STARTS_APP not in site_log, site_log[-3000:]


def _tls_request(port: int, ca: Path, method: str, path: str) -> tuple[int, str]:
    """One raw HTTPS request (path sent exactly as given) to 127.0.0.1:port."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None,
                     headers={"Content-Type": "application/protobuf"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def test_control_api_through_the_proxy_fails_while_fleet_passes(trust: Trust) -> None:
    if trust.proxy is None:
        pytest.skip(NO_NGINX)
    fed, proxy = trust.fed, trust.proxy
    ca = fed.creds / "ca.crt"
    home = fed.root / "flwr-home-via-proxy"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedseg"\n\n[superlink.fedseg]\n'
        f'address = "127.0.0.1:{proxy.port}"\nroot-certificates = "{ca}"\n')
    via_proxy = {**fed.env, "FLWR_HOME": str(home)}
    for args in (["ls"], ["supernode", "ls"],
                 ["supernode", "register", str(fed.keys / "site-a.pub")]):
        done = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=via_proxy,
                              capture_output=True, text=True, timeout=120)
        out = json.loads(done.stdout)
        assert out["success"] is False and "403 Forbidden" in out["error-message"], out
    # The same calls straight to the SuperLink, on its own machine, work.
    assert fed.flwr_json("ls")["success"] is True
    assert len(fed.online_nodes()) == 1  # the site, connected through the proxy

    # Every other API, and paths that only look like Fleet paths, are refused by nginx.
    for method, path in (("POST", "/v1/control/list-runs"), ("GET", "/docs"),
                         ("GET", "/openapi.json"), ("GET", "/health"),
                         ("POST", "/v1/runtime/get-run"),
                         ("POST", "/v1/fleet/../control/list-runs"),
                         ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
                         ("POST", "/v1/fleet/..%2fcontrol/list-runs"),
                         ("POST", "/v1/fleet/get-run/../../control/list-runs"),
                         ("GET", "/v1/fleet/get-run"), ("POST", "/v1/fleet/")):
        status, body = _tls_request(proxy.port, ca, method, path)
        assert status in (403, 400), (method, path, status, body)
        assert "uvicorn" not in body.lower() and '"code"' not in body, (path, body)
    # A Fleet request passes through to the SuperLink, which answers it exactly as it
    # does directly (here: no SuperNode signature, so its own 401). The Control API,
    # asked directly, answers anyone who reaches it, which is why only loopback may.
    status, body = _tls_request(proxy.port, ca, "POST", "/v1/fleet/get-run")
    assert (status, body) == _tls_request(fed.port, ca, "POST", "/v1/fleet/get-run")
    assert status == 401 and "SuperNode authentication" in body, (status, body)
    status, body = _tls_request(fed.port, ca, "POST", "/v1/control/list-runs")
    assert status == 200, (status, body)


@pytest.mark.parametrize("content", [None, "", "{}\n", "# fedseg-coordinator: none\n"])
def test_site_will_not_start_without_a_trusted_key(tmp_path: Path, content: str | None) -> None:
    # No federation needed: the script refuses before it starts Flower.
    for name in ("ca.crt", "site.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "site.toml").write_text("")
    env = {**os.environ, "FEDSEG_SUPERLINK": "127.0.0.1:9", "FEDSEG_BIN": str(BIN),
           "FEDSEG_CA_CERT": str(tmp_path / "ca.crt"),
           "FEDSEG_NODE_KEY": str(tmp_path / "site.key"),
           "FEDSEG_SITE_CONFIG": str(tmp_path / "site.toml")}
    if content is not None:
        (tmp_path / "trusted.yaml").write_text(content)
        env["FEDSEG_TRUSTED_ENTITIES"] = str(tmp_path / "trusted.yaml")
    else:
        env.pop("FEDSEG_TRUSTED_ENTITIES", None)
    done = subprocess.run([str(REPO / "deploy" / "bin" / "fedseg-site")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("fedseg-site: error:") and len(done.stderr.splitlines()) == 1
    assert ("FEDSEG_TRUSTED_ENTITIES" if content is None else "names no key") in done.stderr
