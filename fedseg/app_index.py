"""Signed apps: the coordinator signs each app, every hospital's SuperNode checks it.

Flower's SuperNode started with ``--trusted-entities FILE`` runs a run's app only if
its FAB (Flower App Bundle) carries an Ed25519 signature, over the FAB's SHA-256 and a
timestamp, by one of the keys in FILE (``flwr/supernode/start_client_internal.py``,
``_verify_fab``); otherwise it answers the run with an error and starts nothing.

Flower 1.41's open-source SuperLink attaches signatures to a FAB in one way only: when
``flwr run @publisher/app==x.y.z`` makes it fetch the app from Flower Hub, at the
address in ``FLWR_SUPERGRID_API_URL`` (``POST {url}/hub/fetch-fab`` answers a download
URL and the signatures; ``flwr/superlink/servicer/control/control_handlers.py``,
``_get_remote_fab``). A FAB uploaded from a folder (``flwr run DIR``) always carries
none, so a site with a trust file refuses it.

So the coordinator runs its own small Hub that knows just those two requests:
:func:`sign_app` signs a FAB exactly as ``flwr app review`` signs for Flower Hub and
files it in an index folder, and :func:`make_server` answers the SuperLink from that
folder. Trust rests on neither the index nor the SuperLink: each site checks the
signature itself, against the public keys its own IT put in its trust file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import zipfile
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_fab_config, get_metadata_from_config
from flwr.common.constant import FAB_MAX_SIZE
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

from shared.atomic import write_atomic
from shared.errors import FedsegError

# The SuperLink is started with FLWR_SUPERGRID_API_URL=http://HOST:PORT/v1 and appends
# "/hub/fetch-fab"; the download URLs this index hands out are its own.
API_ROOT = "/v1"
FETCH_PATH = f"{API_ROOT}/hub/fetch-fab"
FAB_PATH = f"{API_ROOT}/fabs/"
DEFAULT_PORT = 8001
# Flower's own patterns for an app id ("@publisher/name") and a version (APP_ID_PATTERN,
# APP_VERSION_PATTERN in flwr/supercore/constant.py): anything else `flwr run` refuses.
# The parts name folders here, so unlike Flower's pattern they may not start with a dot
# ("..", ".hidden").
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_VERSION = re.compile(r"\d+\.\d+\.\d+")
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HOST_HEADER = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
# A fetch request is three short strings; anything larger is not from the SuperLink.
_MAX_REQUEST = 4096


class AppIndexError(FedsegError):
    """An app cannot be signed or filed as asked."""


class AppNotFoundError(AppIndexError):
    """The index holds no signed FAB for the requested app or version."""

    def __init__(self, message: str, available: list[str] | None = None) -> None:
        super().__init__(message)
        self.available = available


@dataclass(frozen=True)
class SignedApp:
    """A FAB filed in the index, and every key that has signed exactly these bytes."""

    app_id: str
    version: str
    fab: Path
    fab_sha256: str
    key_ids: tuple[str, ...]

    @property
    def run_command(self) -> str:
        """What the coordinator types to start a run of this app."""
        return f"flwr run {self.app_id}=={self.version}"


def fab_identity(fab: bytes, where: str) -> tuple[str, str, str]:
    """Return a FAB's (publisher, name, version), read as the SuperLink reads them.

    Parameters
    ----------
    fab : bytes
        The bundle.
    where : str
        Where it came from, for the error message.

    Returns
    -------
    tuple of str
        ``[tool.flwr.app] publisher``, ``[project] name`` and ``[project] version``.
    """
    try:
        fab_id, version = get_metadata_from_config(get_fab_config(fab))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise AppIndexError(
            f"{where}: not a Flower app bundle ({type(exc).__name__}); give the app's folder "
            "(with pyproject.toml) or a .fab made by 'flwr build --app DIR'") from None
    publisher, _, name = fab_id.partition("/")
    if not (_PART.fullmatch(publisher) and _PART.fullmatch(name)):
        raise AppIndexError(
            f"{where}: app id '@{fab_id}' is not '@publisher/name' with letters, digits, "
            "'_', '.' or '-' (not first); fix [tool.flwr.app] publisher or [project] name")
    if not _VERSION.fullmatch(str(version)):
        raise AppIndexError(
            f"{where}: version {version!r} is not x.y.z (digits only), which 'flwr run "
            "@publisher/name==x.y.z' needs; fix [project] version in pyproject.toml")
    return publisher, name, str(version)


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Read an unencrypted Ed25519 private key in OpenSSH format (``ssh-keygen -t ed25519``)."""
    make = "make one with 'fedseg coordinator signing-key --out DIR --name NAME'"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AppIndexError(f"{path}: cannot read the signing key ({exc.strerror}); "
                            f"{make}") from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise AppIndexError(f"{path}: not an unencrypted OpenSSH private key; {make}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise AppIndexError(
            f"{path}: not an Ed25519 key (a site's SuperNode key?); Flower's SuperNodes "
            f"check app signatures only with Ed25519 keys; {make}")
    return key


def signature_record(fab: bytes, key: ed25519.Ed25519PrivateKey, key_id: str,
                     signed_at: int) -> dict[str, Any]:
    """Sign a FAB as Flower does: Ed25519 over 8-byte big-endian ``signed_at`` + SHA-256(FAB).

    Returns
    -------
    dict
        One entry of Flower Hub's ``verifications`` list: ``public_key_id``, the
        signature in unpadded base64url, and ``signed_at`` (Unix seconds).
    """
    message = create_message_to_sign(hashlib.sha256(fab).digest(), signed_at)
    signature = base64.urlsafe_b64encode(key.sign(message)).rstrip(b"=").decode("ascii")
    return {"public_key_id": key_id, "signature": signature, "signed_at": signed_at}


def _read_app(app: Path) -> bytes:
    """Return the FAB bytes of an app folder (built as ``flwr run DIR`` would) or .fab file."""
    if app.is_dir():
        if not (app / "pyproject.toml").is_file():
            raise AppIndexError(f"{app}: no pyproject.toml; give the app's folder (e.g. "
                                "/opt/fedseg) or a .fab file")
        try:
            return build_fab_from_disk(app)
        except (OSError, ValueError) as exc:
            raise AppIndexError(f"{app}: cannot build the app bundle ({exc})") from None
    try:
        return app.read_bytes()
    except OSError as exc:
        raise AppIndexError(f"{app}: cannot read ({exc.strerror}); give the app's folder "
                            "or a .fab file") from None


def _entry_paths(index: Path, publisher: str, name: str, version: str) -> tuple[Path, Path]:
    folder = index / publisher / name
    return folder / f"{version}.fab", folder / f"{version}.json"


def _read_signatures(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """Return the FAB digest a signature file is for, and its verification records."""
    try:
        data = json.loads(path.read_text())
        digest, records = data["fab-sha256"], data["verifications"]
    except (OSError, ValueError, KeyError, TypeError):
        raise AppIndexError(f"{path}: damaged signature file; sign the app again with "
                            "'fedseg coordinator sign-app'") from None
    if not isinstance(digest, str) or not isinstance(records, list):
        raise AppIndexError(f"{path}: damaged signature file; sign the app again with "
                            "'fedseg coordinator sign-app'")
    return digest, records


def sign_app(app: Path, key_path: Path, index: Path, key_id: str | None = None,
             signed_at: int | None = None) -> SignedApp:
    """Sign an app's FAB and file it, with its signatures, in the index folder.

    Parameters
    ----------
    app : Path
        The app's folder (its FAB is built as ``flwr run`` would) or a ``.fab`` file.
    key_path : Path
        The coordinator's Ed25519 signing key (OpenSSH format).
    index : Path
        The index folder the app index serves; the FAB goes to
        ``<index>/<publisher>/<name>/<version>.fab``, its signatures beside it.
    key_id : str, optional
        The id sites list the public key under in their trust file; default the
        key file's name without ``.key``.
    signed_at : int, optional
        Unix time of the signature (default now).

    Returns
    -------
    SignedApp
        What was filed. Signing the same bytes again with another key adds a
        signature; a FAB with different bytes under the same version replaces the
        entry and every signature of the old bytes.
    """
    key = load_signing_key(key_path)
    key_id = key_id if key_id is not None else key_path.name.removesuffix(".key")
    if not _KEY_ID.fullmatch(key_id):
        raise AppIndexError(f"--key-id {key_id!r}: use letters, digits, '.', '_' or '-' (at "
                            "most 63), as in the sites' trusted-entities file")
    fab = _read_app(app)
    if len(fab) > FAB_MAX_SIZE:
        raise AppIndexError(f"{app}: the app bundle is {len(fab)} bytes, more than the "
                            f"{FAB_MAX_SIZE} the SuperLink accepts; exclude data and "
                            "results from it ([tool.flwr.app] fab-include)")
    publisher, name, version = fab_identity(fab, str(app))
    fab_path, signatures_path = _entry_paths(index, publisher, name, version)
    digest = hashlib.sha256(fab).hexdigest()
    records: list[dict[str, Any]] = []
    if signatures_path.exists():
        old_digest, old_records = _read_signatures(signatures_path)
        if old_digest == digest:
            records = [r for r in old_records if r.get("public_key_id") != key_id]
    when = int(time.time()) if signed_at is None else signed_at
    records.append(signature_record(fab, key, key_id, when))

    def write_fab(tmp: Path) -> None:
        tmp.write_bytes(fab)
        tmp.chmod(0o644)

    def write_signatures(tmp: Path) -> None:
        tmp.write_text(json.dumps({"fab-sha256": digest, "verifications": records}, indent=1))
        tmp.chmod(0o644)

    # FAB first: between the two renames the old signatures fail against the new bytes,
    # so a run started in that instant is refused by the sites, never run unchecked.
    write_atomic(fab_path, write_fab)
    write_atomic(signatures_path, write_signatures)
    return SignedApp(f"@{publisher}/{name}", version, fab_path, digest,
                     tuple(str(r["public_key_id"]) for r in records))


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def find_app(index: Path, app_id: str, version: str | None) -> tuple[Path, list[dict[str, Any]]]:
    """Return a signed app's FAB path and verification records.

    ``version`` None means the highest version in the index. Raises
    :class:`AppNotFoundError` (with the versions there are, when the app exists).
    """
    publisher, _, name = app_id.removeprefix("@").partition("/")
    if not (app_id.startswith("@") and _PART.fullmatch(publisher) and _PART.fullmatch(name)):
        raise AppNotFoundError(f"app id {app_id!r} is not '@publisher/name'")
    if version is not None and not _VERSION.fullmatch(version):
        raise AppNotFoundError(f"app version {version!r} is not x.y.z")
    folder = index / publisher / name
    available = sorted((p.stem for p in folder.glob("*.fab")
                        if _VERSION.fullmatch(p.stem) and p.with_suffix(".json").is_file()),
                       key=_version_key)
    if not available:
        raise AppNotFoundError(f"{app_id}: no signed app in this index")
    chosen = version if version is not None else available[-1]
    if chosen not in available:
        raise AppNotFoundError(f"{app_id}=={chosen}: not signed in this index", available)
    fab_path, signatures_path = _entry_paths(index, publisher, name, chosen)
    return fab_path, _read_signatures(signatures_path)[1]


class _IndexServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, index: Path, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.index = index


class _Handler(BaseHTTPRequestHandler):
    server: _IndexServer
    server_version = "fedseg-app-index"
    sys_version = ""

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def do_POST(self) -> None:
        """Answer the SuperLink's ``fetch-fab`` as Flower Hub does."""
        if self.path != FETCH_PATH:
            self._json(HTTPStatus.NOT_FOUND, {"detail": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= _MAX_REQUEST:
                raise ValueError(length)
            request = json.loads(self.rfile.read(length))
            app_id = str(request["app_id"])
            version = request.get("app_version")
            version = None if version is None else str(version)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._json(HTTPStatus.BAD_REQUEST, {"detail": "expected JSON with app_id"})
            return
        try:
            fab, verifications = find_app(self.server.index, app_id, version)
        except AppNotFoundError as exc:
            detail: Any = ({"available_app_versions": exc.available}
                           if exc.available is not None else str(exc))
            self._json(HTTPStatus.NOT_FOUND, {"detail": detail})
            return
        except AppIndexError as exc:
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"detail": str(exc)})
            return
        # The download URL is on the address the SuperLink itself used to reach us.
        host = self.headers.get("Host", "")
        if not _HOST_HEADER.fullmatch(host):
            bound_host, bound_port = self.server.server_address[:2]
            host = f"{bound_host!s}:{bound_port}"
        publisher, name = fab.parent.parent.name, fab.parent.name
        url = f"http://{host}{FAB_PATH}{publisher}/{name}/{fab.name}"
        self._json(HTTPStatus.OK, {"fab_url": url, "verifications": verifications})

    def do_GET(self) -> None:
        """Serve a FAB named by a URL that ``do_POST`` handed out."""
        parts = self.path.removeprefix(FAB_PATH).split("/")
        ok = (self.path.startswith(FAB_PATH) and len(parts) == 3
              and _PART.fullmatch(parts[0]) is not None and _PART.fullmatch(parts[1]) is not None
              and parts[2].endswith(".fab")
              and _VERSION.fullmatch(parts[2].removesuffix(".fab")) is not None)
        if not ok:
            self._json(HTTPStatus.NOT_FOUND, {"detail": "not found"})
            return
        try:
            fab, _ = find_app(self.server.index, f"@{parts[0]}/{parts[1]}",
                              parts[2].removesuffix(".fab"))
            body = fab.read_bytes()
        except (AppIndexError, OSError):
            self._json(HTTPStatus.NOT_FOUND, {"detail": "not found"})
            return
        self._send(HTTPStatus.OK, body, "application/octet-stream")


def make_server(index: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT
                ) -> ThreadingHTTPServer:
    """Return (not yet serving) the app index for the SuperLink on ``host:port``.

    It reads the index folder on every request, so a newly signed app is served at
    once. Bind it to the loopback address on the SuperLink's machine: only the
    SuperLink needs it (``FLWR_SUPERGRID_API_URL=http://HOST:PORT/v1``).
    """
    try:
        return _IndexServer(index, (host, port))
    except OSError as exc:
        raise AppIndexError(f"{host}:{port}: cannot listen ({exc.strerror}); choose another "
                            "--port (and the same in the SuperLink's FEDSEG_APP_INDEX)") from None
