"""Credentials for a deployment: a private CA, the SuperLink's TLS pair, site keys.

The coordinator makes the CA and the SuperLink's certificate and hands out only
``ca.crt``; each hospital makes its own authentication key pair and hands out
only the public half, which the coordinator registers with the SuperLink. The
coordinator's app-signing key works the same way: only its public half goes to the
hospitals, into their SuperNodes' trusted-entities files. No private key ever has
to leave the machine that made it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.atomic import write_atomic
from shared.errors import FedsegError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"

# Flower's SuperNode authentication signs with a NIST curve in OpenSSH format.
NODE_CURVE = ec.SECP384R1()
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HOST = re.compile(r"(?=.{1,253}$)(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")
# The SuperLink starts its own SuperExec, which connects back over TLS to the
# loopback address and checks the certificate, so these names are always included.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650


class CredentialError(FedsegError):
    """Credentials cannot be written as asked."""


@dataclass(frozen=True)
class CoordinatorCredentials:
    """Paths of the files written by :func:`write_coordinator_credentials`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]
    not_after: dt.datetime


@dataclass(frozen=True)
class SigningKey:
    """Paths of the coordinator's app-signing key pair, and what sites put in their trust file."""

    private_key: Path
    public_key: Path
    fingerprint: str
    key_id: str
    trusted_entity: str
    trust_file: Path


@dataclass(frozen=True)
class NodeKey:
    """Paths of a site's key pair and the public key's SHA256 fingerprint."""

    private_key: Path
    public_key: Path
    fingerprint: str


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def check_hosts(hosts: tuple[str, ...]) -> tuple[str, ...]:
    """Return ``hosts`` de-duplicated, or raise naming the first unusable one."""
    if not hosts:
        raise CredentialError(
            "--host: give at least one name or address the sites use to reach the SuperLink, "
            "e.g. --host fl.hospital-network.org --host 10.0.0.5")
    out: list[str] = []
    for host in hosts:
        if not _is_ip(host) and not _HOST.fullmatch(host):
            raise CredentialError(
                f"--host {host!r}: not a DNS name or IP address; give the name exactly as "
                "sites will write it in FEDSEG_SUPERLINK (without a port)")
        if host not in out:
            out.append(host)
    return tuple(out)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _subject_alternative_names(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        if _is_ip(host):
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        else:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificate_authority(
    common_name: str, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a new self-signed CA key and certificate valid for ``days`` days."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: tuple[str, ...],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a TLS server key and certificate for ``hosts``, signed by the CA."""
    hosts = check_hosts(hosts)
    key = ec.generate_private_key(ec.SECP384R1())
    start = _now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def public_key_fingerprint(openssh_public_key: bytes) -> str:
    """Return ``SHA256:...`` as ``ssh-keygen -l`` prints it, for checking a key by phone."""
    parts = openssh_public_key.split()
    if len(parts) < 2:
        raise CredentialError("not an OpenSSH public key (expected 'TYPE BASE64 ...')")
    digest = hashlib.sha256(base64.b64decode(parts[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise CredentialError(
            f"{existing[0]}: already exists; replacing credentials locks out everyone who "
            "holds the old ones, so move it away first or pass --force")


def _write(path: Path, data: bytes, secret: bool) -> None:
    """Write ``data`` atomically; a secret is never readable by anyone but its owner."""

    def write(tmp: Path) -> None:
        # The temporary file is created 0600, so a secret is never exposed, not even
        # for a moment; a public file is opened up before it takes its final name.
        tmp.write_bytes(data)
        if not secret:
            tmp.chmod(0o644)

    write_atomic(path, write)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_ca(cert_path: Path, key_path: Path
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Read the federation's CA certificate and key for re-issuing the SuperLink's certificate."""
    for path in (cert_path, key_path):
        if not path.is_file():
            raise CredentialError(
                f"{path}: not found; --renew re-issues superlink.crt from the existing CA, so "
                "give the CA's key with --ca-key (or run without --renew to start a new CA)")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise CredentialError(f"{cert_path} / {key_path}: not a PEM certificate and unencrypted "
                              f"key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or (
            key.public_key().public_numbers() != cert.public_key().public_numbers()):  # type: ignore[union-attr]
        raise CredentialError(f"{key_path}: is not the key of {cert_path}; give the CA's own key")
    return key, cert


def write_coordinator_credentials(out: Path, hosts: tuple[str, ...], days: int = 825,
                                  force: bool = False, renew: bool = False,
                                  ca_key_path: Path | None = None) -> CoordinatorCredentials:
    """Write a private CA and the SuperLink's TLS certificate and key into ``out``.

    Parameters
    ----------
    out : Path
        Folder for ``ca.crt``, ``ca.key``, ``superlink.crt`` and ``superlink.key``.
    hosts : tuple of str
        Every DNS name and IP address sites use to reach the SuperLink; they go
        into the certificate's subject alternative names, with the loopback names.
    days : int
        Validity of the SuperLink's certificate (the CA gets at least ten years,
        so renewing the certificate never means sending sites a new ``ca.crt``).
    force : bool
        Replace existing files (which invalidates the old CA for every site).
    renew : bool
        Keep the existing CA and re-issue only ``superlink.crt`` and ``superlink.key``.
    ca_key_path : Path, optional
        Where the CA's key is when it is kept away from ``out`` (with ``renew``).

    Returns
    -------
    CoordinatorCredentials
        Where each file went.
    """
    if days < 1:
        raise CredentialError(f"--days {days}: must be at least 1")
    hosts = check_hosts((*check_hosts(hosts), *LOOPBACK_HOSTS))
    paths = [out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY]
    if renew:
        ca_key, ca_cert = _load_ca(paths[0], ca_key_path or paths[1])
    else:
        _refuse_overwrite(paths, force)
        ca_key, ca_cert = make_certificate_authority("fedseg federation CA", max(days, CA_DAYS))
    key, cert = make_server_certificate(ca_key, ca_cert, hosts, days)
    if not renew:
        _write(paths[0], ca_cert.public_bytes(serialization.Encoding.PEM), secret=False)
        _write(paths[1], _pem_key(ca_key), secret=True)
    _write(paths[2], cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(paths[3], _pem_key(key), secret=True)
    return CoordinatorCredentials(ca_cert=paths[0], ca_key=paths[1], server_cert=paths[2],
                                  server_key=paths[3], hosts=hosts,
                                  not_after=cert.not_valid_after_utc)


def write_node_key(out: Path, name: str, force: bool = False) -> NodeKey:
    """Write a site's SuperNode authentication key pair as ``<name>.key`` and ``<name>.pub``.

    The private key stays at the site (mode 0600); the public key is what the
    coordinator registers with ``flwr supernode register``.
    """
    if not _NAME.fullmatch(name):
        raise CredentialError(
            f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 63), e.g. "
            "--name st-marys-radiology")
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    _refuse_overwrite([private_path, public_path], force)
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    public += f" fedseg-{name}\n".encode()
    _write(private_path, private, secret=True)
    _write(public_path, public, secret=False)
    return NodeKey(private_path, public_path, public_key_fingerprint(public))


def write_signing_key(out: Path, name: str, force: bool = False) -> SigningKey:
    """Write the coordinator's app-signing key pair as ``<name>.key`` and ``<name>.pub``.

    Flower's SuperNodes check an app's signature with Ed25519 public keys in OpenSSH
    form, each under an id (``--trusted-entities``); ``name`` is that id, and
    ``trusted_entity`` is the line hospital IT adds to the site's trust file.
    ``<name>.trusted-entities.yaml`` holds just that line: a site's whole trust file.
    """
    if not _NAME.fullmatch(name):
        raise CredentialError(
            f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 63), e.g. "
            "--name fedseg-coordinator")
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    trust_path = out / f"{name}.trusted-entities.yaml"
    _refuse_overwrite([private_path, public_path, trust_path], force)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    public += f" fedseg-app-signing-{name}".encode()
    entity = f'{name}: "{public.decode()}"'
    _write(private_path, private, secret=True)
    _write(public_path, public + b"\n", secret=False)
    _write(trust_path, f"# Apps signed by the fedseg coordinator's key {name} "
           f"({public_key_fingerprint(public)}).\n{entity}\n".encode(), secret=False)
    return SigningKey(private_path, public_path, public_key_fingerprint(public), name, entity,
                      trust_path)
