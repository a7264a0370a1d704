"""Local CA and server certificate for the embedded setup, made with cryptography.

The CA signs one server certificate for ``localhost``, ``127.0.0.1`` and ``::1`` (plus
any host names given). Clients verify the service against ``ca.pem``. Production points
``PLINGS_TLS_CERT``, ``PLINGS_TLS_KEY`` and ``PLINGS_TLS_CA`` at its own material.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from plings_hsm.home import write_private_file

__all__ = ["TlsFiles", "ensure_local_tls"]

log = structlog.get_logger(__name__)

CA_VALIDITY_DAYS = 3650
"""Lifetime of the local CA."""

SERVER_VALIDITY_DAYS = 397
"""Lifetime of the server certificate; 397 days is the CA/Browser Forum maximum."""

RENEW_BEFORE_DAYS = 30
"""A server certificate that expires within this many days is replaced."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the CA certificate, the server certificate and the server key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plings-hsm local CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: tuple[str, ...],
    now: datetime.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plings-hsm service")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _needs_server_cert(path: Path, ca_cert: x509.Certificate, now: datetime.datetime) -> bool:
    if not path.exists():
        return True
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    if cert.issuer != ca_cert.subject:
        return True
    return cert.not_valid_after_utc - now < datetime.timedelta(days=RENEW_BEFORE_DAYS)


def ensure_local_tls(tls_dir: Path, extra_hosts: tuple[str, ...] = ()) -> TlsFiles:
    """Create the local CA and server certificate under ``tls_dir`` unless present and valid.

    Keys are written with mode 0600. An existing CA is kept; a server certificate is
    replaced when missing, issued by another CA or within 30 days of expiry.
    """
    files = TlsFiles(tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key")
    ca_key_path = tls_dir / "ca.key"
    now = datetime.datetime.now(datetime.UTC)

    if files.ca_cert.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise TypeError(f"{ca_key_path} is not an EC private key")
        ca_key = loaded
    else:
        ca_key, ca_cert = _make_ca(now)
        write_private_file(ca_key_path, _private_key_pem(ca_key))
        write_private_file(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        log.info("tls_ca_created", path=str(files.ca_cert))

    if _needs_server_cert(files.server_cert, ca_cert, now):
        hosts = ("localhost", "127.0.0.1", "::1", *extra_hosts)
        key, cert = _make_server(ca_key, ca_cert, hosts, now)
        write_private_file(files.server_key, _private_key_pem(key))
        write_private_file(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))
        log.info("tls_server_cert_created", path=str(files.server_cert), hosts=list(hosts))
    return files
