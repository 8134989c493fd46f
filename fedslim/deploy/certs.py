"""TLS certificates for a fedslim deployment: a private CA and a SuperLink certificate.

    python -m fedslim.deploy.certs --out certs --host superlink.example.org --host 10.0.0.5

writes ``ca.crt`` (give it to every SuperNode and every ``flwr`` user), ``server.crt`` and
``server.key`` (the SuperLink's; the key is mode 0600). The certificate always names
``localhost`` and ``127.0.0.1`` besides the given hosts: the SuperLink's own SuperExec and
ServerApp processes connect to it over loopback and verify it, and without that name
``flwr run`` would wait with no error. The CA's private key is not kept unless
``--ca-key`` says where (without it no further certificate can be signed by this CA, which
is the point: run the command again to replace all three files).

Files are written atomically (a temporary file renamed into place), so a reader never sees
half a certificate. Existing files are kept (the command is safe to repeat, e.g. before
every start of a SuperLink) unless ``--force``; kept files are checked first (the
certificate is signed by ``ca.crt``, matches the key, is valid now, and names loopback and
every ``--host``), so a bring-your-own certificate that would make ``flwr run`` wait
forever fails with one line instead.

Uses ``cryptography`` (a dependency of Flower); keys are ECDSA P-256.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedslim.errors import ConfigError

__all__ = ["CertPaths", "check_certificates", "make_certificates", "parse_host"]

LOOPBACK = ("localhost", "127.0.0.1")
MAX_DAYS = 3650
_DNS = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)"
                  r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$")


@dataclass(frozen=True)
class CertPaths:
    """Where :func:`make_certificates` put (or found) the files."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    created: bool  # False: all three existed and were kept


def parse_host(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """An IP address, or a DNS name (letters, digits, ``-``, ``_``, dots); else ConfigError."""
    if not isinstance(host, str) or not host:
        raise ConfigError(f"--host {host!r}: expected a DNS name or an IP address")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not _DNS.match(host):
        raise ConfigError(f"--host {host!r}: expected a DNS name (letters, digits, '-', '.') "
                          "or an IP address")
    return host.rstrip(".").lower()


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_certificates(out_dir: Path, hosts: Sequence[str] = (), days: int = 365,
                      force: bool = False, ca_key: Path | None = None) -> CertPaths:
    """Create ``ca.crt``, ``server.crt`` and ``server.key`` in ``out_dir``.

    Parameters
    ----------
    out_dir
        Created if missing.
    hosts
        DNS names / IP addresses the SuperNodes and users reach the SuperLink by; loopback
        names are always added.
    days
        Validity of both certificates, 1..3650.
    force
        Replace existing files (otherwise, if all three exist, they are kept).
    ca_key
        Also write the CA's private key there (mode 0600); by default it is discarded.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"--days {days!r}: expected an integer in [1, {MAX_DAYS}]")
    names = [parse_host(h) for h in (*hosts, *LOOPBACK)]
    out_dir = Path(out_dir)
    paths = CertPaths(out_dir / "ca.crt", out_dir / "server.crt", out_dir / "server.key",
                      created=True)
    existing = [p.exists() for p in (paths.ca_cert, paths.server_cert, paths.server_key)]
    if all(existing) and not force:
        kept = CertPaths(paths.ca_cert, paths.server_cert, paths.server_key, created=False)
        check_certificates(kept, hosts)
        return kept
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    sans: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in names:
        if str(name) in seen:
            continue
        seen.add(str(name))
        sans.append(x509.DNSName(name) if isinstance(name, str) else x509.IPAddress(name))

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate clock skew
    until = now + dt.timedelta(days=days)
    ca_private = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedslim deployment CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_private.public_key()),
                       critical=False)
        .sign(ca_private, hashes.SHA256()))
    server_private = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0]))]))
        .issuer_name(ca_name).public_key(server_private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_private.public_key()), critical=False)
        .sign(ca_private, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    key_format = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # The key first, the CA last: a reader that waits for ca.crt finds the other two.
    _write_atomic(paths.server_key, server_private.private_bytes(pem, *key_format), 0o600)
    _write_atomic(paths.server_cert, server_cert.public_bytes(pem), 0o644)
    if ca_key is not None:
        _write_atomic(Path(ca_key), ca_private.private_bytes(pem, *key_format), 0o600)
    _write_atomic(paths.ca_cert, ca_cert.public_bytes(pem), 0o644)
    return paths


def check_certificates(paths: CertPaths, hosts: Sequence[str] = ()) -> None:
    """ConfigError (one line) unless ``server.crt`` is signed by ``ca.crt``, matches
    ``server.key``, is valid now and names loopback and every host."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    def load(path: Path, what: str) -> bytes:
        data = path.read_bytes()
        if len(data) > 1 << 20:
            raise ConfigError(f"{path}: {len(data)} bytes is too large for a {what}")
        return data

    try:
        ca = x509.load_pem_x509_certificate(load(paths.ca_cert, "certificate"))
        cert = x509.load_pem_x509_certificate(load(paths.server_cert, "certificate"))
        key = serialization.load_pem_private_key(load(paths.server_key, "key"), None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{paths.ca_cert.parent}: unreadable PEM file ({exc}); delete "
                          "ca.crt, server.crt and server.key to have new ones written") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"{paths.server_cert} is not signed by {paths.ca_cert}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, pub) != cert.public_key().public_bytes(der, pub):
        raise ConfigError(f"{paths.server_key} is not the key of {paths.server_cert}")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError(f"{paths.server_cert} is not valid now (valid "
                          f"{cert.not_valid_before_utc:%Y-%m-%d} to "
                          f"{cert.not_valid_after_utc:%Y-%m-%d})")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    named = {str(n).lower() for n in san.get_values_for_type(x509.DNSName)}
    named |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    for host in ("127.0.0.1", *hosts):
        if str(parse_host(host)) not in named:
            why = (": the SuperLink's own SuperExec and ServerApp connect over loopback and "
                   "would wait forever" if host == "127.0.0.1" else "")
            raise ConfigError(f"{paths.server_cert} does not name {host} in its "
                              f"subjectAltName{why}; add it, or delete ca.crt, server.crt "
                              "and server.key to have new ones written")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fedslim.deploy.certs",
        description="Write a CA certificate and a SuperLink certificate/key for TLS.")
    parser.add_argument("--out", type=Path, required=True, help="directory for the files")
    parser.add_argument("--host", action="append", default=[],
                        help="DNS name or IP of the SuperLink (repeatable); localhost and "
                             "127.0.0.1 are always included")
    parser.add_argument("--days", type=int, default=365, help="validity (1..3650)")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.add_argument("--ca-key", type=Path, default=None,
                        help="also keep the CA's private key here (default: discarded)")
    args = parser.parse_args(argv)
    try:
        paths = make_certificates(args.out, args.host, args.days, args.force, args.ca_key)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write certificates to {args.out}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    verb = "wrote" if paths.created else "kept existing"
    print(f"{verb} {paths.ca_cert}, {paths.server_cert}, {paths.server_key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
