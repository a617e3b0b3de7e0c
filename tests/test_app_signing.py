"""Signed apps: keys, signatures, the index folder and the index server, checked by Flower.

The signatures are checked with Flower's own code: the SuperLink's conversion of a Hub
answer (``_format_verification``), the SuperNode's check (``_verify_fab``) and its
trust-file validation, and Flower's Hub client (``request_download_link``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import stat
import threading
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from flwr.supercore.fab import Fab
from flwr.supercore.utils import request_download_link
from flwr.superlink.servicer.control.control_handlers import _format_verification
from flwr.supernode.cli.flower_supernode import _validate_public_keys_ed25519
from flwr.supernode.start_client_internal import _verify_fab

from fedseg.app_index import (
    AppIndexError,
    AppNotFoundError,
    find_app,
    load_signing_key,
    make_server,
    sign_app,
    signature_record,
)
from fedseg.cli import EXIT_BAD_INPUT, main
from fedseg.credentials import CredentialError, write_node_key, write_signing_key
from tests.conftest import REPO

SEED = bytes(range(32))


def fixed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(SEED)


def fab_bytes(version: str = "1.2.3", extra: bytes = b"") -> bytes:
    """A minimal valid FAB: a zip whose pyproject.toml Flower accepts."""
    pyproject = (
        '[project]\nname = "demo"\nversion = "' + version + '"\n'
        '[tool.flwr.app]\npublisher = "clinic"\n'
        '[tool.flwr.app.components]\nserverapp = "a:b"\nclientapp = "c:d"\n'
        '[tool.flwr.app.config]\nx = 1\n')
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("pyproject.toml", pyproject)
        z.writestr("app.py", b"print('hi')\n" + extra)
    return buffer.getvalue()


def trusted(key: ed25519.Ed25519PrivateKey, key_id: str = "coordinator") -> dict[str, str]:
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return {key_id: public.decode()}


def site_accepts(fab: bytes, verifications: list[dict[str, Any]] | None,
                 trust: dict[str, str]) -> bool:
    """What a SuperNode decides, through the SuperLink's conversion of the Hub answer."""
    records = (_format_verification(verifications) if verifications is not None
               else {"valid_license": ""})
    if not records.get("valid_license"):
        return False
    return _verify_fab(Fab(hashlib.sha256(fab).hexdigest(), fab, records), trust)


def write_key(path: Path, key: ed25519.Ed25519PrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    return path


# --------------------------------------------------------------------------- signatures


def test_signature_is_flowers_message_signed_with_the_key() -> None:
    fab = b"fab-bytes"
    record = signature_record(fab, fixed_key(), "coordinator", 1_700_000_000)
    assert record["public_key_id"] == "coordinator" and record["signed_at"] == 1_700_000_000
    signature = base64.urlsafe_b64decode(record["signature"] + "==")
    assert "=" not in record["signature"] and len(signature) == 64
    # Flower's canonical message: 8-byte big-endian timestamp, then SHA-256 of the FAB.
    message = bytes.fromhex("000000006553f100") + hashlib.sha256(fab).digest()
    fixed_key().public_key().verify(signature, message)  # raises if not exactly this
    # Ed25519 is deterministic: the same inputs give the same signature, byte for byte.
    assert signature_record(fab, fixed_key(), "coordinator", 1_700_000_000) == record
    assert signature_record(fab, fixed_key(), "coordinator", 1_700_000_001) != record


def test_flowers_supernode_accepts_only_the_trusted_key_on_the_signed_bytes() -> None:
    fab, key, rogue = fab_bytes(), fixed_key(), ed25519.Ed25519PrivateKey.generate()
    good = signature_record(fab, key, "coordinator", 1_700_000_000)
    assert site_accepts(fab, [good], trusted(key))
    # Changed after signing (one byte more in a file).
    assert not site_accepts(fab_bytes(extra=b"#"), [good], trusted(key))
    # Signed by another key under the trusted id, or under its own id.
    assert not site_accepts(fab, [signature_record(fab, rogue, "coordinator", 1)], trusted(key))
    assert not site_accepts(fab, [signature_record(fab, rogue, "rogue", 1)], trusted(key))
    # The trusted key's signature under an id the site does not list.
    assert not site_accepts(fab, [signature_record(fab, key, "other", 1)], trusted(key))
    # Unsigned: what the SuperLink attaches to a FAB uploaded by `flwr run DIR`.
    assert not site_accepts(fab, None, trusted(key))
    # One good signature among bad ones is enough.
    assert site_accepts(fab, [signature_record(fab, rogue, "rogue", 1), good], trusted(key))


# --------------------------------------------------------------------------- keys


def test_signing_key_pair_and_the_line_for_the_sites(tmp_path: Path) -> None:
    made = write_signing_key(tmp_path, "fedseg-coordinator")
    assert stat.S_IMODE(made.private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.public_key.stat().st_mode) == 0o644
    public = load_ssh_public_key(made.public_key.read_bytes())
    assert isinstance(public, ed25519.Ed25519PublicKey)
    assert load_signing_key(made.private_key).public_key() == public
    # The printed line is a trusted-entities file Flower's SuperNode accepts as it is.
    entities = yaml.safe_load(made.trusted_entity)
    assert list(entities) == ["fedseg-coordinator"]
    assert entities["fedseg-coordinator"] == made.public_key.read_text().strip()
    _validate_public_keys_ed25519(entities)
    # The file to send the hospitals is exactly that line (and a comment naming the key).
    assert yaml.safe_load(made.trust_file.read_text()) == entities
    assert made.fingerprint in made.trust_file.read_text()
    assert stat.S_IMODE(made.trust_file.stat().st_mode) == 0o644
    assert made.fingerprint.startswith("SHA256:")
    with pytest.raises(CredentialError, match="already exists"):
        write_signing_key(tmp_path, "fedseg-coordinator")


def test_example_trust_file_has_the_default_key_id() -> None:
    text = (REPO / "deploy" / "config" / "trusted-entities.example.yaml").read_text()
    entities = yaml.safe_load(text)
    assert list(entities) == ["fedseg-coordinator"]
    assert entities["fedseg-coordinator"].startswith("ssh-ed25519 ")


@pytest.mark.parametrize("case", ["missing", "site key", "garbage"])
def test_unusable_signing_key_is_one_line(tmp_path: Path, case: str) -> None:
    if case == "site key":  # the ECDSA key a hospital's SuperNode authenticates with
        path = write_node_key(tmp_path, "site-a").private_key
        expected = "not an Ed25519 key"
    elif case == "garbage":
        path = tmp_path / "k.key"
        path.write_text("not a key")
        expected = "not an unencrypted OpenSSH private key"
    else:
        path, expected = tmp_path / "nope.key", "cannot read the signing key"
    with pytest.raises(AppIndexError, match=expected) as info:
        load_signing_key(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- index folder


def test_sign_app_files_the_fab_and_its_signatures(tmp_path: Path) -> None:
    fab = tmp_path / "demo.fab"
    fab.write_bytes(fab_bytes())
    key = write_key(tmp_path / "coordinator.key", fixed_key())
    second = write_key(tmp_path / "backup.key", ed25519.Ed25519PrivateKey.generate())
    index = tmp_path / "index"
    signed = sign_app(fab, key, index, signed_at=1_700_000_000)
    assert signed.app_id == "@clinic/demo" and signed.version == "1.2.3"
    assert signed.fab == index / "clinic" / "demo" / "1.2.3.fab"
    assert signed.fab.read_bytes() == fab.read_bytes()
    assert signed.fab_sha256 == hashlib.sha256(fab.read_bytes()).hexdigest()
    assert signed.key_ids == ("coordinator",)  # default id: the key file's name
    assert signed.run_command == "flwr run @clinic/demo==1.2.3"

    # A second key adds its signature; signing again with the first replaces its own.
    assert sign_app(fab, second, index).key_ids == ("coordinator", "backup")
    assert sign_app(fab, key, index, signed_at=5).key_ids == ("backup", "coordinator")
    path, records = find_app(index, "@clinic/demo", "1.2.3")
    assert path == signed.fab and [r["signed_at"] for r in records][1] == 5
    assert site_accepts(fab.read_bytes(), records, trusted(fixed_key()))

    # New bytes under the same version replace the entry and every old signature.
    fab.write_bytes(fab_bytes(extra=b"# changed"))
    assert sign_app(fab, second, index).key_ids == ("backup",)
    path, records = find_app(index, "@clinic/demo", None)
    assert path.read_bytes() == fab.read_bytes()
    assert not site_accepts(path.read_bytes(), records, trusted(fixed_key()))


def test_sign_app_builds_a_folder_as_flwr_run_does(tmp_path: Path) -> None:
    key = write_key(tmp_path / "fedseg-coordinator.key", fixed_key())
    signed = sign_app(REPO, key, tmp_path / "index")
    assert signed.app_id == "@fedseg/fedseg"
    with zipfile.ZipFile(signed.fab) as z:
        names = z.namelist()
    assert "pyproject.toml" in names and "client/app.py" in names and "server/app.py" in names
    assert not any(n.startswith(("tests/", "deploy/", "fedseg/")) for n in names)


@pytest.mark.parametrize(("case", "expected"), [
    ("not a zip", "not a Flower app bundle"),
    ("folder without pyproject", "no pyproject.toml"),
    ("bad version", "is not x.y.z"),
    ("bad key id", "--key-id"),
])
def test_sign_app_bad_input_is_one_line(tmp_path: Path, case: str, expected: str) -> None:
    key = write_key(tmp_path / "k.key", fixed_key())
    app, key_id = tmp_path / "app.fab", None
    if case == "not a zip":
        app.write_text("hello")
    elif case == "folder without pyproject":
        app = tmp_path / "empty"
        app.mkdir()
    elif case == "bad version":
        app.write_bytes(fab_bytes(version="1.0"))
    else:
        app.write_bytes(fab_bytes())
        key_id = "bad id: x"
    with pytest.raises(AppIndexError, match=expected) as info:
        sign_app(app, key, tmp_path / "index", key_id)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "index").exists()


def test_find_app_picks_the_highest_version_and_lists_the_others(tmp_path: Path) -> None:
    key = write_key(tmp_path / "k.key", fixed_key())
    for version in ("1.2.3", "1.10.0", "1.9.9"):
        (tmp_path / f"{version}.fab").write_bytes(fab_bytes(version))
        sign_app(tmp_path / f"{version}.fab", key, tmp_path / "index")
    assert find_app(tmp_path / "index", "@clinic/demo", None)[0].name == "1.10.0.fab"
    with pytest.raises(AppNotFoundError) as info:
        find_app(tmp_path / "index", "@clinic/demo", "2.0.0")
    assert info.value.available == ["1.2.3", "1.9.9", "1.10.0"]
    for app_id in ("@clinic/other", "clinic/demo", "@../demo"):
        with pytest.raises(AppNotFoundError):
            find_app(tmp_path / "index", app_id, None)


# --------------------------------------------------------------------------- index server


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    key = write_key(tmp_path / "coordinator.key", fixed_key())
    (tmp_path / "app.fab").write_bytes(fab_bytes())
    sign_app(tmp_path / "app.fab", key, tmp_path / "index", signed_at=1_700_000_000)
    server: ThreadingHTTPServer = make_server(tmp_path / "index", "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", tmp_path
    finally:
        server.shutdown()
        server.server_close()


def test_index_answers_flowers_hub_client(served: tuple[str, Path]) -> None:
    url, folder = served
    fab_url, verifications, note = request_download_link(
        "@clinic/demo", "1.2.3", f"{url}/hub/fetch-fab", "fab_url")
    assert fab_url == f"{url}/fabs/clinic/demo/1.2.3.fab" and note is None
    assert verifications == [signature_record(fab_bytes(), fixed_key(), "coordinator",
                                              1_700_000_000)]
    with urllib.request.urlopen(fab_url, timeout=30) as response:
        downloaded = response.read()
    assert downloaded == (folder / "app.fab").read_bytes()
    assert site_accepts(downloaded, verifications, trusted(fixed_key()))
    # No version: the highest one, as Flower Hub does.
    assert request_download_link("@clinic/demo", None, f"{url}/hub/fetch-fab",
                                 "fab_url")[0] == fab_url


def test_index_refuses_what_it_does_not_hold(served: tuple[str, Path]) -> None:
    url, folder = served
    # A signed-looking entry outside the index folder, one ".." above it.
    outside = folder / "stolen"
    outside.mkdir()
    (outside / "1.2.3.fab").write_bytes(fab_bytes())
    (outside / "1.2.3.json").write_text((folder / "index/clinic/demo/1.2.3.json").read_text())
    with pytest.raises(ValueError, match="not found"):
        request_download_link("@../stolen", "1.2.3", f"{url}/hub/fetch-fab", "fab_url")
    with pytest.raises(ValueError, match=r"Available app versions for @clinic/demo: 1\.2\.3"):
        request_download_link("@clinic/demo", "9.9.9", f"{url}/hub/fetch-fab", "fab_url")
    with pytest.raises(ValueError, match="not found"):
        request_download_link("@clinic/other", None, f"{url}/hub/fetch-fab", "fab_url")
    for path in ("/fabs/../stolen/1.2.3.fab", "/fabs/clinic/demo/../../../app.fab",
                 "/fabs/clinic/demo/9.9.9.fab",
                 "/fabs/clinic/demo/1.2.3.json", "/hub/fetch-fab"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url + path, timeout=30)
        assert info.value.code == 404, path
    bad = urllib.request.Request(f"{url}/hub/fetch-fab", data=b"[1, 2]", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad, timeout=30)
    assert info.value.code == 400
    assert json.loads(info.value.read()) == {"detail": "expected JSON with app_id"}


# --------------------------------------------------------------------------- CLI


def test_cli_signs_and_reports_bad_input_in_one_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["coordinator", "signing-key", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'fedseg-coordinator: "ssh-ed25519 ' in out
    (tmp_path / "app.fab").write_bytes(fab_bytes())
    assert main(["coordinator", "sign-app", str(tmp_path / "app.fab"), "--key",
                 str(tmp_path / "fedseg-coordinator.key"), "--index", str(tmp_path / "i")]) == 0
    assert "flwr run @clinic/demo==1.2.3" in capsys.readouterr().out
    site = write_node_key(tmp_path, "site-a")
    assert main(["coordinator", "sign-app", str(tmp_path / "app.fab"), "--key",
                 str(site.private_key), "--index", str(tmp_path / "i")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("fedseg: error: ") and len(err.splitlines()) == 1
    assert "not an Ed25519 key" in err
