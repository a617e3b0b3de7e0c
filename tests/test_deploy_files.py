"""Checks on the deployment files: systemd units, Dockerfiles, compose.yaml, nginx.

The units are parsed here and, where ``systemd-analyze`` exists, verified by systemd
itself; compose.yaml is validated against a small schema (the subset of the Compose
spec it uses) and, where a Compose CLI works, by ``docker compose config``; the Fleet
proxy's nginx configuration is checked by ``nginx -t`` where nginx is installed (and
run for real in tests/test_deploy_trust.py).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

SYSTEMD = REPO / "deploy" / "systemd"
DOCKER = REPO / "deploy" / "docker"
BIN = REPO / "deploy" / "bin"
PROXY_CONF = REPO / "deploy" / "proxy" / "fedseg-fleet.conf"
INSTALL_ROOT = "/opt/fedseg"

UNITS = {
    "fedseg-superlink.service": {
        "script": "fedseg-superlink",
        "env_file": "/etc/fedseg/superlink.env",
        "state": "fedseg/coordinator",
    },
    "fedseg-site.service": {
        "script": "fedseg-site",
        "env_file": "/etc/fedseg/site.env",
        "state": "fedseg/site",
    },
    "fedseg-app-index.service": {
        "script": "fedseg-app-index",
        "env_file": "/etc/fedseg/superlink.env",
        "state": "fedseg/coordinator",
    },
}

# Environment each deploy/bin script reads (the interface between these files and it).
SCRIPT_ENV = {
    "fedseg-superlink": {"FEDSEG_BIN", "FEDSEG_CREDENTIALS", "FEDSEG_HOST", "FEDSEG_PORT",
                         "FEDSEG_STATE_DIR", "FEDSEG_APP_INDEX", "FEDSEG_EXTRA_ARGS"},
    "fedseg-site": {"FEDSEG_BIN", "FEDSEG_SUPERLINK", "FEDSEG_CA_CERT", "FEDSEG_NODE_KEY",
                    "FEDSEG_TRUSTED_ENTITIES", "FEDSEG_SITE_CONFIG", "FEDSEG_MAX_RETRIES",
                    "FEDSEG_MAX_WAIT_TIME", "FEDSEG_CLIENTAPPIO_PORT", "FEDSEG_EXTRA_ARGS"},
    "fedseg-register-sites": {"FEDSEG_BIN", "FEDSEG_SUPERLINK", "FEDSEG_CA_CERT"},
    "fedseg-app-index": {"FEDSEG_BIN", "FEDSEG_APP_INDEX", "FEDSEG_APP_INDEX_DIR",
                         "FEDSEG_STATE_DIR"},
}
INTERFACE_ENV = set().union(*SCRIPT_ENV.values())
# Flower's own switches the units set (home directory, telemetry, update check).
FLOWER_ENV = {"FLWR_HOME", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"}
SITES = ("site-a", "site-b", "site-c")


# --------------------------------------------------------------------------- systemd

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Parse a systemd unit file: section -> [(key, value), ...] in file order.

    Repeated keys are kept (systemd accumulates or resets them), comments and blank
    lines are skipped, and a trailing backslash continues a line.
    """
    sections: Unit = {}
    current: str | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            if current in sections:
                raise ValueError(f"line {number}: section [{current}] appears twice")
            sections[current] = []
            continue
        if current is None or "=" not in line:
            raise ValueError(f"line {number}: not 'Key=value' inside a section: {raw!r}")
        key, value = line.split("=", 1)
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= should appear once, found {found}"
    return found[0]


def load_unit(name: str) -> Unit:
    return parse_unit((SYSTEMD / name).read_text())


def test_parser_keeps_repeated_keys_and_rejects_garbage() -> None:
    unit = parse_unit("[Service]\n# c\nEnvironment=A=1\nEnvironment=B=2 \\\n  C=3\n")
    assert values(unit, "Service", "Environment") == ["A=1", "B=2 C=3"]
    with pytest.raises(ValueError, match="line 2"):
        parse_unit("[Service]\nRestart on-failure\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_unit("Restart=on-failure\n")


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_has_what_hospital_it_expects(name: str) -> None:
    spec = UNITS[name]
    unit = load_unit(name)
    assert set(unit) == {"Unit", "Service", "Install"}

    assert one(unit, "Unit", "Description")
    assert "network-online.target" in one(unit, "Unit", "After").split()
    assert "network-online.target" in one(unit, "Unit", "Wants").split()
    assert one(unit, "Unit", "Documentation") == f"file://{INSTALL_ROOT}/README.md"

    state = f"/var/lib/{spec['state']}"
    expected = {
        "Type": "simple",
        "User": "fedseg",
        "Group": "fedseg",
        "EnvironmentFile": spec["env_file"],
        "WorkingDirectory": state,
        "ExecStart": f"{INSTALL_ROOT}/deploy/bin/{spec['script']}",
        "Restart": "on-failure",
        "KillMode": "control-group",
        "StateDirectory": spec["state"],
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": state,
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }
    for key, value in expected.items():
        assert one(unit, "Service", key) == value, key
    assert re.fullmatch(r"\d+s?", one(unit, "Service", "RestartSec"))
    assert re.fullmatch(r"\d+s?", one(unit, "Service", "TimeoutStopSec"))
    assert one(unit, "Install", "WantedBy") == "multi-user.target"

    # Environment= defaults name only the script's interface and Flower's switches.
    names = {entry.split("=", 1)[0] for entry in values(unit, "Service", "Environment")}
    fedseg_names = {n for n in names if n.startswith("FEDSEG_")}
    assert fedseg_names <= SCRIPT_ENV[spec["script"]], fedseg_names - SCRIPT_ENV[spec["script"]]
    assert names - fedseg_names <= FLOWER_ENV | {"HOME"}
    for entry in values(unit, "Service", "Environment"):
        key, value = entry.split("=", 1)
        if key in {"FLWR_HOME", "HOME"}:  # the only writable place under ProtectSystem=strict
            assert value.startswith(state), entry


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_starts_a_script_from_the_repository(name: str) -> None:
    exec_start = one(load_unit(name), "Service", "ExecStart")
    assert exec_start.startswith(INSTALL_ROOT + "/"), exec_start
    script = REPO / exec_start.removeprefix(INSTALL_ROOT + "/")
    assert script.is_file(), f"{exec_start} -> {script} does not exist"
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_site_unit_leaves_the_gpu_visible() -> None:
    site = load_unit("fedseg-site.service")
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "MemoryDenyWriteExecute"):
        assert not values(site, "Service", key), f"{key}= in the site unit would hide CUDA"
    # The coordinator has no GPU, so there the stricter setting is fine.
    assert one(load_unit("fedseg-superlink.service"), "Service", "PrivateDevices") == "yes"


def systemd_verify(units: dict[str, str], folder: Path) -> list[str]:
    """Run ``systemd-analyze verify`` on units (name -> text); return its complaints.

    systemd-analyze exits 0 for most problems (unknown keys, unparsable values),
    only logging a warning, so every line that names one of the units counts.
    """
    exe = shutil.which("systemd-analyze")
    assert exe is not None
    paths = []
    for name, text in units.items():
        path = folder / name
        path.write_text(text.replace(INSTALL_ROOT, str(REPO)))
        paths.append(str(path))
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0"}
    done = subprocess.run([exe, "verify", "--man=no", *paths], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    problems = [line for line in lines if any(name in line for name in units)]
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}: {lines}")
    return problems


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not on PATH (install the 'systemd' package to verify the units)")


@needs_systemd_analyze
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    units = {name: (SYSTEMD / name).read_text() for name in UNITS}
    assert systemd_verify(units, tmp_path) == []


@needs_systemd_analyze
@pytest.mark.parametrize(("old", "new"), [
    ("Restart=on-failure", "Restrat=on-failure"),
    ("ExecStart=/opt/fedseg/deploy/bin/fedseg-site", "ExecStart=deploy/bin/fedseg-site"),
    ("ExecStart=/opt/fedseg/deploy/bin/fedseg-site", "ExecStart=/opt/fedseg/bin/no-such-script"),
    ("ProtectSystem=strict", "ProtectSystem=strikt"),
])
def test_systemd_check_catches_a_broken_unit(tmp_path: Path, old: str, new: str) -> None:
    text = (SYSTEMD / "fedseg-site.service").read_text()
    assert old in text
    assert systemd_verify({"fedseg-site.service": text.replace(old, new)}, tmp_path)


# --------------------------------------------------------------------------- compose

_STRING = {"type": "string"}
_STRINGS = {"type": "array", "items": _STRING}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(us|ms|s|m|h))+$"}
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"

# The subset of the Compose specification that compose.yaml uses; anything else
# (a typo'd key above all) is refused.
COMPOSE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["services"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]*$"},
        "services": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"},
            "additionalProperties": {"$ref": "#/$defs/service"},
        },
        "volumes": {
            "type": "object",
            "additionalProperties": {
                "type": ["object", "null"],
                "properties": {"driver": _STRING, "name": _STRING, "external": {"type": "boolean"}},
                "additionalProperties": False,
            },
        },
        "networks": {
            "type": "object",
            "additionalProperties": {
                "type": ["object", "null"],
                "properties": {"driver": _STRING, "name": _STRING, "internal": {"type": "boolean"}},
                "additionalProperties": False,
            },
        },
    },
    "patternProperties": {"^x-": {}},
    "additionalProperties": False,
    "$defs": {
        "service": {
            "type": "object",
            "anyOf": [{"required": ["image"]}, {"required": ["build"]}],
            "properties": {
                "image": _STRING,
                "build": {"oneOf": [_STRING, {
                    "type": "object",
                    "required": ["context"],
                    "properties": {"context": _STRING, "dockerfile": _STRING,
                                   "args": {"type": "object"}},
                    "additionalProperties": False,
                }]},
                "command": {"oneOf": [_STRING, _STRINGS]},
                "environment": {"oneOf": [
                    {"type": "object", "propertyNames": {"pattern": _ENV_NAME},
                     "additionalProperties": {"type": ["string", "number", "boolean", "null"]}},
                    {"type": "array",
                     "items": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*(=.*)?$"}},
                ]},
                "volumes": {"type": "array", "items": {"oneOf": [
                    {"type": "string", "pattern": r"^[^:]+:/[^:]*(:(ro|rw))?$"},
                    {"$ref": "#/$defs/mount"},
                ]}},
                "ports": {"type": "array", "items": {
                    "type": "string",
                    "pattern": r"^(\[?[0-9a-fA-F.:]+\]?:)?[0-9]+(-[0-9]+)?(:[0-9]+(-[0-9]+)?)?"
                               r"(/(tcp|udp))?$"}},
                "depends_on": {"oneOf": [_STRINGS, {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["condition"],
                        "properties": {
                            "condition": {"enum": ["service_started", "service_healthy",
                                                   "service_completed_successfully"]},
                            "restart": {"type": "boolean"},
                            "required": {"type": "boolean"},
                        },
                        "additionalProperties": False,
                    },
                }]},
                "healthcheck": {
                    "type": "object",
                    "properties": {
                        "test": {"oneOf": [
                            _STRING,
                            {"type": "array", "minItems": 1,
                             "prefixItems": [{"enum": ["CMD", "CMD-SHELL", "NONE"]}],
                             "items": _STRING},
                        ]},
                        "interval": _DURATION,
                        "timeout": _DURATION,
                        "start_period": _DURATION,
                        "retries": {"type": "integer", "minimum": 0},
                        "disable": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
                "restart": {"type": "string",
                            "pattern": r"^(no|always|unless-stopped|on-failure(:[0-9]+)?)$"},
                "deploy": {
                    "type": "object",
                    "properties": {"resources": {
                        "type": "object",
                        "properties": {"reservations": {
                            "type": "object",
                            "properties": {"devices": {"type": "array", "items": {
                                "type": "object",
                                "required": ["capabilities"],
                                "properties": {
                                    "driver": _STRING,
                                    "count": {"oneOf": [{"type": "integer", "minimum": 1},
                                                        {"const": "all"}]},
                                    "device_ids": _STRINGS,
                                    "capabilities": {**_STRINGS, "minItems": 1},
                                    "options": {"type": "object"},
                                },
                                "additionalProperties": False,
                            }}},
                            "additionalProperties": False,
                        }},
                        "additionalProperties": False,
                    }},
                    "additionalProperties": False,
                },
                "init": {"type": "boolean"},
                "working_dir": {"type": "string", "pattern": "^/"},
                "stop_grace_period": _DURATION,
                "user": _STRING,
                "networks": {**_STRINGS, "minItems": 1, "uniqueItems": True},
            },
            "additionalProperties": False,
        },
        "mount": {
            "type": "object",
            "required": ["type", "source", "target"],
            "properties": {
                "type": {"enum": ["bind", "volume"]},
                "source": _STRING,
                "target": {"type": "string", "pattern": "^/"},
                "read_only": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with (DOCKER / "compose.yaml").open() as f:
        return yaml.safe_load(f)


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """A service's volumes in long form (type, source, target, read_only)."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out.append({"read_only": False, **entry})
            continue
        source, target, *mode = entry.split(":")
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append({"type": kind, "source": source, "target": target,
                    "read_only": mode == ["ro"]})
    return out


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(COMPOSE_SCHEMA)


def test_compose_matches_the_schema(compose: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(COMPOSE_SCHEMA).validate(compose)


@pytest.mark.parametrize("damage", ["misspelled service key", "unknown condition",
                                    "unquoted restart no", "unknown top-level key"])
def test_schema_refuses_a_broken_compose_file(compose: dict[str, Any], damage: str) -> None:
    broken = copy.deepcopy(compose)
    if damage == "misspelled service key":
        broken["services"]["site-a"]["restrat"] = broken["services"]["site-a"].pop("restart")
    elif damage == "unknown condition":
        broken["services"]["site-b"]["depends_on"]["register"]["condition"] = "service_done"
    elif damage == "unquoted restart no":  # YAML 1.1 reads a bare `no` as false
        broken["services"]["register"]["restart"] = False
    else:
        broken["servces"] = broken.pop("services")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(COMPOSE_SCHEMA).validate(broken)


def test_compose_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"superlink", "register", "app-index", "proxy", *SITES}
    assert set(compose["volumes"]) == {"coordinator-state", *(f"{s}-state" for s in SITES)}
    # The sites share a network with the proxy alone; the SuperLink is not on it.
    assert set(compose["networks"]) == {"coordinator", "fleet"}
    on_fleet = {name for name, s in services.items() if "fleet" in s["networks"]}
    assert on_fleet == {"proxy", *SITES}
    for name in ("superlink", "register", "app-index"):
        assert services[name]["networks"] == ["coordinator"], name

    link = services["superlink"]
    assert link["command"] == ["fedseg-superlink"]
    # Published on loopback only, for the coordinator's flwr CLI: the port also carries
    # the unauthenticated Control API.
    assert link["ports"] == ["127.0.0.1:8000:8000"]
    assert "8000" in " ".join(link["healthcheck"]["test"])
    assert link["restart"] == "unless-stopped"
    assert {"type": "volume", "source": "coordinator-state",
            "target": "/var/lib/fedseg/coordinator", "read_only": False} in mounts(link)
    assert link["environment"]["FEDSEG_APP_INDEX"] == "app-index:8001"

    index = services["app-index"]
    assert index["command"] == ["fedseg-app-index"]
    assert index["environment"]["FEDSEG_APP_INDEX"].endswith(":8001")
    assert {"type": "bind", "source": "./apps", "target": index["environment"][
        "FEDSEG_APP_INDEX_DIR"], "read_only": True} in mounts(index)
    assert "ports" not in index

    proxy = services["proxy"]
    assert proxy["ports"] == ["9092:9092"]  # the one port the hospitals reach
    assert proxy["networks"] == ["coordinator", "fleet"]
    assert proxy["depends_on"] == {"superlink": {"condition": "service_healthy"}}

    register = services["register"]
    assert register["depends_on"] == {"superlink": {"condition": "service_healthy"}}
    assert register["command"][0] == "fedseg-register-sites"
    assert register["command"][1:] == [f"/etc/fedseg/credentials/{s}.pub" for s in SITES]
    assert register.get("restart", "no") == "no"


def test_compose_uses_the_site_anchor() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    assert re.search(r"^x-site: &site$", text, re.MULTILINE)
    assert len(re.findall(r"^    <<: \*site$", text, re.MULTILINE)) == len(SITES)


@pytest.mark.parametrize("site", SITES)
def test_site_service(compose: dict[str, Any], site: str) -> None:
    service = compose["services"][site]
    assert service["command"] == ["fedseg-site"]
    assert service["restart"] == "unless-stopped"
    assert service["depends_on"] == {"register": {"condition": "service_completed_successfully"},
                                     "proxy": {"condition": "service_started"}}
    assert service["networks"] == ["fleet"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices

    env = service["environment"]
    assert env["FEDSEG_SUPERLINK"] == "proxy:9092"
    assert env["FEDSEG_TRUSTED_ENTITIES"] == "/etc/fedseg/trusted-entities.yaml"
    assert env["FEDSEG_NODE_KEY"] == f"/etc/fedseg/credentials/{site}.key"
    assert env["FEDSEG_SITE_CONFIG"] == "/etc/fedseg/site.toml"

    by_target = {m["target"]: m for m in mounts(service)}
    assert by_target["/etc/fedseg/credentials"]["read_only"] is True
    assert by_target["/etc/fedseg/credentials"]["source"] == "./credentials"
    assert by_target["/data"] == {"type": "bind", "source": f"./data/{site}", "target": "/data",
                                  "read_only": True}
    assert by_target["/etc/fedseg/site.toml"]["source"] == f"./{site}.toml"
    assert by_target["/etc/fedseg/site.toml"]["read_only"] is True
    assert by_target["/var/lib/fedseg/site"]["source"] == f"{site}-state"
    assert by_target["/etc/fedseg/trusted-entities.yaml"] == {
        "type": "bind", "source": "./trusted-entities.yaml",
        "target": "/etc/fedseg/trusted-entities.yaml", "read_only": True}


def test_every_service_mounts_credentials_read_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        creds = [m for m in mounts(service) if m["target"] == "/etc/fedseg/credentials"]
        if name == "app-index":  # serves public app bundles; needs no key at all
            assert not creds
            continue
        assert creds, f"{name} does not mount the credentials"
        assert all(m["read_only"] for m in creds), f"{name} mounts credentials writable"


def test_compose_environment_is_the_scripts_interface(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name == "proxy":  # nginx, configured by its image (proxy.Dockerfile)
            assert "command" not in service and "environment" not in service
            continue
        script = service["command"][0]
        assert (BIN / script).is_file(), f"{name}: {script} is not in deploy/bin"
        env = service.get("environment", {})
        unknown = set(env) - SCRIPT_ENV[script]
        assert not unknown, f"{name}: {script} does not read {sorted(unknown)}"
        targets = [m["target"] for m in mounts(service)]
        for key, value in env.items():  # every file it names is mounted
            if str(value).startswith(("/etc/", "/data")):
                assert any(str(value).startswith(t) for t in targets), f"{name}: {key}={value}"
    text = (DOCKER / "compose.yaml").read_text()
    interpolated = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    assert interpolated <= INTERFACE_ENV, interpolated - INTERFACE_ENV


def test_compose_build_points_at_the_dockerfile(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO, f"{name}: build context {context} is not the repository"
        assert (context / build["dockerfile"]).is_file()
        expected = "proxy.Dockerfile" if name == "proxy" else "Dockerfile"
        assert (context / build["dockerfile"]).resolve() == DOCKER / expected


def test_site_toml_example_matches_the_mounts(compose: dict[str, Any]) -> None:
    with (DOCKER / "site-a.toml.example").open("rb") as f:
        config = tomllib.load(f)
    assert config == {"data-path": "/data", "state-dir": "/var/lib/fedseg/site",
                      "site-name": "site-a", "device": "auto", "dp-enabled": False}
    targets = {m["target"] for m in mounts(compose["services"]["site-a"])}
    assert {config["data-path"], config["state-dir"]} <= targets


def _compose_cli() -> list[str] | None:
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) is None:
            continue
        probe = subprocess.run([*cli, "version"], capture_output=True, text=True,
                               timeout=60, check=False)
        if probe.returncode == 0:
            return cli
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no working Compose CLI ('docker compose' v2 plugin or 'docker-compose')")
    done = subprocess.run([*cli, "-f", "compose.yaml", "config", "-q"], cwd=DOCKER,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(name: str = "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (DOCKER / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and line[0] != "#"]


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pat.removeprefix("**/")) or fnmatch.fnmatch(p, pat)
               for pat in patterns for p in prefixes)


def test_dockerfile_base_install_and_user() -> None:
    steps = dockerfile_instructions()
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert froms and froms[0].split()[0].startswith("python:3.11"), froms

    runs = [i for i, (keyword, args) in enumerate(steps) if keyword == "RUN"
            and re.search(r"pip install (--?[\w-]+(=\S+)? )*\.($|\s)", args)]
    assert runs, "the Dockerfile does not `pip install .` the project"

    users = [(i, args) for i, (keyword, args) in enumerate(steps) if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    last_index, user = users[-1]
    assert user.split(":")[0] not in {"root", "0"}
    assert any(keyword == "RUN" and re.search(rf"useradd\b.*\b{user}$", args)
               for keyword, args in steps), f"user {user} is never created"
    # pip ran as root into the image's own interpreter, before USER.
    assert runs[0] < last_index


def test_dockerfile_fedseg_bin_is_where_pip_puts_scripts() -> None:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    # The python:3.11 images build Python with prefix /usr/local, and a root pip
    # install uses the posix_prefix scheme: console scripts go to <prefix>/bin.
    scripts = sysconfig.get_path("scripts", "posix_prefix",
                                 vars={"base": "/usr/local", "platbase": "/usr/local"})
    assert env["FEDSEG_BIN"] == scripts == "/usr/local/bin"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "proxy.Dockerfile"])
def test_dockerfile_copies_existing_paths(dockerfile: str) -> None:
    patterns = _dockerignore()
    copies = [args for keyword, args in dockerfile_instructions(dockerfile)
              if keyword in {"COPY", "ADD"}]
    assert copies
    for args in copies:
        if args.startswith("["):
            words = json.loads(args)
        else:
            words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert "--from" not in args, "multi-stage copies are not expected here"
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not _ignored(source.rstrip("/"), patterns), f"COPY {source}: in .dockerignore"


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    patterns = _dockerignore()
    for path in (".git", ".venv", "runs", "fedseg-state", "benchmarks/results",
                 "deploy/docker/credentials", "deploy/docker/data", "deploy/docker/site-a.toml",
                 "deploy/docker/signing", "deploy/docker/apps",
                 "deploy/docker/trusted-entities.yaml", "client/__pycache__"):
        assert _ignored(path, patterns), f"{path} would be sent to the Docker build"
    assert not _ignored("deploy/docker/site-a.toml.example", patterns)


def test_proxy_image_is_debians_nginx_with_the_shipped_server_block() -> None:
    steps = dockerfile_instructions("proxy.Dockerfile")
    assert steps[0][0] == "FROM" and steps[0][1].startswith("debian:bookworm")
    assert any(keyword == "RUN" and re.search(r"apt-get install .*\bnginx\b", args)
               for keyword, args in steps)
    assert ("COPY", "deploy/proxy/fedseg-fleet.conf /etc/nginx/conf.d/fedseg-fleet.conf") in steps
    # The one edit: the upstream, from loopback to the superlink container. The RUN
    # greps for the result, so a server block that changed its upstream line breaks
    # the build instead of shipping a proxy that points nowhere.
    assert "server 127.0.0.1:8000;" in PROXY_CONF.read_text()
    assert any(keyword == "RUN" and "s/server 127.0.0.1:8000;/" in args and "grep -q" in args
               for keyword, args in steps)
    assert dict(steps)["CMD"] == '["nginx", "-g", "daemon off;"]'


# --------------------------------------------------------------------------- nginx


def _locations(conf: str) -> dict[str, str]:
    """location pattern -> its block's text (the blocks here hold no nested braces but
    limit_except's, which is kept inside its location)."""
    out: dict[str, str] = {}
    for match in re.finditer(r"location\s+([^{]+?)\s*\{", conf):
        depth, i = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(conf[i], 0)
            i += 1
        out[match.group(1)] = conf[match.end():i - 1]
    return out


def test_proxy_forwards_only_the_fleet_api() -> None:
    from fedseg.credentials import CA_CERT, SERVER_CERT, SERVER_KEY

    conf = "\n".join(line.split("#")[0] for line in PROXY_CONF.read_text().splitlines())
    locations = _locations(conf)
    assert set(locations) == {"~ ^/v1/fleet/[a-z][a-z-]*$", "/"}
    assert locations["/"].split() == ["return", "403;"]
    fleet = locations["~ ^/v1/fleet/[a-z][a-z-]*$"]
    assert conf.count("proxy_pass") == 1 and "proxy_pass https://fedseg_superlink$uri;" in fleet
    assert re.search(r"limit_except POST \{\s*deny all;\s*\}", fleet)
    # TLS to the SuperLink is checked against the federation's CA, under a name
    # `fedseg coordinator certs` always puts in the certificate.
    assert "proxy_ssl_verify on;" in fleet
    assert f"proxy_ssl_trusted_certificate /etc/fedseg/credentials/{CA_CERT};" in fleet
    assert "proxy_ssl_name localhost;" in fleet
    assert f"ssl_certificate /etc/fedseg/credentials/{SERVER_CERT};" in conf
    assert f"ssl_certificate_key /etc/fedseg/credentials/{SERVER_KEY};" in conf
    assert re.search(r"listen 9092 ssl;", conf) and "server 127.0.0.1:8000;" in conf


@pytest.mark.parametrize("broken", [False, True])
def test_nginx_accepts_the_proxy_config(tmp_path: Path, broken: bool) -> None:
    from fedseg.credentials import write_coordinator_credentials
    from tests.test_deploy_trust import NGINX, NO_NGINX, render_proxy_conf

    if NGINX is None:
        pytest.skip(NO_NGINX)
    creds = write_coordinator_credentials(tmp_path / "creds", ("fl.example.org",))
    text = PROXY_CONF.read_text()
    if broken:
        text = text.replace("proxy_ssl_verify on;", "proxy_ssl_verify yes please;")
    (tmp_path / "temp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_proxy_conf(text, creds.ca_cert.parent, 9, 8, tmp_path))
    done = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(conf),
                           "-e", str(tmp_path / "error.log")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode != 0) == broken, done.stderr
