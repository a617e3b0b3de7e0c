"""Deployment credentials: the CA, the SuperLink's certificate, site keys, site config."""

from __future__ import annotations

import base64
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from client.config import SiteConfig
from fedseg.cli import EXIT_BAD_INPUT, main
from fedseg.credentials import (
    CredentialError,
    public_key_fingerprint,
    write_coordinator_credentials,
    write_node_key,
)
from shared.errors import ConfigError
from simulations.phantoms import write_synthetic_federation


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_fingerprint_is_sha256_of_the_key_blob_as_ssh_keygen_prints_it() -> None:
    line = b"ecdsa-sha2-nistp384 " + base64.b64encode(b"abc") + b" comment"
    assert public_key_fingerprint(line) == "SHA256:ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0"
    with pytest.raises(CredentialError):
        public_key_fingerprint(b"garbage")


def test_superlink_certificate_names_every_host_and_chains_to_the_ca(tmp_path: Path) -> None:
    made = write_coordinator_credentials(tmp_path, ("fl.example.org", "10.0.0.5", "localhost",
                                                    "10.0.0.5"), days=30)
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # Loopback names are always in: the SuperLink's own SuperExec connects over TLS to them.
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    assert made.hosts == ("fl.example.org", "10.0.0.5", "localhost", "127.0.0.1", "::1")
    assert mode(made.ca_key) == 0o600 and mode(made.server_key) == 0o600
    assert mode(made.ca_cert) & 0o022 == 0  # never group- or world-writable


def test_renew_reissues_the_superlink_certificate_from_the_same_ca(tmp_path: Path) -> None:
    first = write_coordinator_credentials(tmp_path, ("fl.example.org",))
    ca_before = first.ca_cert.read_bytes()
    old_cert = first.server_cert.read_bytes()
    offline = tmp_path / "offline" / "ca.key"
    offline.parent.mkdir()
    first.ca_key.rename(offline)
    with pytest.raises(CredentialError, match=r"ca\.key: not found.*--ca-key"):
        write_coordinator_credentials(tmp_path, ("fl.example.org",), renew=True)
    made = write_coordinator_credentials(tmp_path, ("fl.example.org", "fl2.example.org"),
                                         renew=True, ca_key_path=offline)
    assert made.ca_cert.read_bytes() == ca_before and not first.ca_key.exists()
    assert made.server_cert.read_bytes() != old_cert
    cert = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_before))
    assert "fl2.example.org" in cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    stranger = write_coordinator_credentials(tmp_path / "other", ("x.org",))
    with pytest.raises(CredentialError, match="is not the key of"):
        write_coordinator_credentials(tmp_path, ("fl.example.org",), renew=True,
                                      ca_key_path=stranger.ca_key)


def test_node_key_is_a_p384_openssh_pair_with_a_private_half_only_the_owner_reads(
        tmp_path: Path) -> None:
    key = write_node_key(tmp_path, "hospital-a")
    private = load_ssh_private_key(key.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(key.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert key.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert mode(key.private_key) == 0o600
    assert key.fingerprint == public_key_fingerprint(key.public_key.read_bytes())


def test_existing_credentials_are_never_silently_replaced(tmp_path: Path) -> None:
    first = write_node_key(tmp_path, "site-a")
    before = first.private_key.read_bytes()
    with pytest.raises(CredentialError, match=r"already exists.*--force"):
        write_node_key(tmp_path, "site-a")
    assert first.private_key.read_bytes() == before
    assert write_node_key(tmp_path, "site-a", force=True).private_key.read_bytes() != before
    write_coordinator_credentials(tmp_path, ("localhost",))
    with pytest.raises(CredentialError, match=r"ca\.crt: already exists"):
        write_coordinator_credentials(tmp_path, ("localhost",))


@pytest.mark.parametrize("args, fragment", [
    (["coordinator", "certs", "--out", "{tmp}", "--host", "bad host"], "--host 'bad host'"),
    (["coordinator", "certs", "--out", "{tmp}", "--host", "*foo"], "--host '*foo'"),
    (["coordinator", "certs", "--out", "{tmp}", "--host", "x", "--days", "0"], "--days 0"),
    (["site", "keygen", "--out", "{tmp}", "--name", "../escape"], "--name '../escape'"),
])
def test_bad_credential_requests_get_one_clear_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("fedseg: error: ") and fragment in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_cli_prints_where_each_file_went(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["coordinator", "certs", "--out", str(tmp_path), "--host", "localhost"]) == 0
    assert main(["site", "keygen", "--out", str(tmp_path), "--name", "site-a"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "superlink.crt") in out and "SHA256:" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca.crt", "ca.key", "site-a.key", "site-a.pub", "superlink.crt", "superlink.key"]


def test_misspelt_node_config_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'dp-enabeld'.*dp-enabled"):
        SiteConfig.from_node_config({"data-path": "x", "dp-enabeld": True})
    # Keys the simulation engine adds are not the site's mistake.
    SiteConfig.from_node_config({"data-path": "x", "partition-id": 0, "num-partitions": 3})


def test_site_check_reads_the_daemons_own_node_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = write_synthetic_federation(tmp_path / "d", 1, 3, shape=(32, 32))[0]
    config = tmp_path / "site.toml"
    config.write_text(f'data-path = "{site}"\nsite-name = "st-marys"\ndp-enabled = true\n'
                      'dp-noise-multiplier = 1.0\n')
    assert main(["site", "check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "site 'st-marys'" in out and "DP-SGD on" in out and "3 cases, 0 with problems" in out

    config.write_text(f'data-path = "{site}"\ndevice = "gpu"\n')
    assert main(["site", "check", "--config", str(config)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(config) in err and "'device'" in err

    config.write_text('data-path = "unterminated\n')
    assert main(["site", "check", "--config", str(config)]) == EXIT_BAD_INPUT
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["site", "check", "--config", str(tmp_path / "missing.toml")]) == EXIT_BAD_INPUT
    assert "node config not found" in capsys.readouterr().err
