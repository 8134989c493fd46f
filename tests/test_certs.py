"""fedslim.deploy.certs: the CA and SuperLink certificate really verify over TLS."""

from __future__ import annotations

import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedslim.deploy.certs import make_certificates, parse_host
from fedslim.errors import ConfigError


def _handshake(paths_dir: Path, server_name: str, ca: Path) -> str:
    """A real TLS handshake on loopback: serve server.crt, verify it against ``ca``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths_dir / "server.crt", paths_dir / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(ca))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            return tls.recv(2).decode()
    finally:
        thread.join(timeout=10)
        listener.close()


def test_the_certificate_verifies_for_every_name_and_loopback(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, ["superlink", "10.0.0.5"])
    assert paths.created
    for name in ("superlink", "localhost", "127.0.0.1"):
        assert _handshake(tmp_path, name, paths.ca_cert) == "ok"
    # A name the certificate does not carry fails verification.
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path, "other.example.org", paths.ca_cert)


def test_another_ca_does_not_verify_it(tmp_path: Path) -> None:
    make_certificates(tmp_path / "a")
    other = make_certificates(tmp_path / "b")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path / "a", "localhost", other.ca_cert)


def test_modes_idempotence_and_force(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, ["superlink"])
    assert stat.S_IMODE(paths.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.server_cert.stat().st_mode) == 0o644
    assert not (tmp_path / "ca.key").exists()  # the CA key is discarded by default
    before = paths.ca_cert.read_bytes()
    again = make_certificates(tmp_path, ["superlink"])
    assert not again.created and again.ca_cert.read_bytes() == before
    forced = make_certificates(tmp_path, ["superlink"], force=True)
    assert forced.created and forced.ca_cert.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "server.crt", "server.key"]


def test_a_partial_set_is_replaced(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path)
    paths.server_key.unlink()
    assert make_certificates(tmp_path).created
    assert _handshake(tmp_path, "localhost", paths.ca_cert) == "ok"


@pytest.mark.parametrize("host", ["", "bad host", "a..b", "-x", "x" * 64, "evil/../x"])
def test_bad_hosts_are_refused(host: str) -> None:
    with pytest.raises(ConfigError, match="--host"):
        parse_host(host)


@pytest.mark.parametrize("days", [0, -1, 3651, True])
def test_bad_days_are_refused(tmp_path: Path, days: int) -> None:
    with pytest.raises(ConfigError, match="--days"):
        make_certificates(tmp_path, days=days)
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_one_line_errors_and_success(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fedslim.deploy.certs", "--out", str(tmp_path / "c")]
    bad = subprocess.run([*cmd, "--host", "bad host"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "--host 'bad host'" in bad.stderr
    assert "Traceback" not in bad.stderr
    ok = subprocess.run([*cmd, "--host", "superlink", "--ca-key", str(tmp_path / "ca.key")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("wrote ")
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    kept = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert kept.returncode == 0 and kept.stdout.startswith("kept existing ")


def _openssl_cert(tmp_path: Path, san: str) -> None:
    """A bring-your-own CA + certificate made with openssl, with the given subjectAltName."""
    run = lambda *a: subprocess.run(a, cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=ca", "-keyout", "ca.key", "-out", "ca.crt")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=superlink",
        "-keyout", "server.key", "-out", "server.csr")
    (tmp_path / "ext.cnf").write_text(f"subjectAltName={san}\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.crt")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_kept_certificates_are_checked(tmp_path: Path) -> None:
    """Bring-your-own files: docs/deployment.md's openssl recipe passes; without
    IP:127.0.0.1 (flwr run would wait forever) or the service's name, one clear error."""
    good, no_loopback = tmp_path / "good", tmp_path / "noloop"
    good.mkdir()
    no_loopback.mkdir()
    _openssl_cert(good, "DNS:superlink,IP:127.0.0.1")
    _openssl_cert(no_loopback, "DNS:superlink")
    assert not make_certificates(good, ["superlink"]).created
    with pytest.raises(ConfigError, match="127.0.0.1 .*wait forever"):
        make_certificates(no_loopback, ["superlink"])
    with pytest.raises(ConfigError, match="does not name other.example.org"):
        make_certificates(good, ["other.example.org"])


def test_mismatched_files_are_refused(tmp_path: Path) -> None:
    a = make_certificates(tmp_path / "a")
    b = make_certificates(tmp_path / "b")
    shutil.copy(b.ca_cert, a.ca_cert)  # certificate not signed by this CA
    with pytest.raises(ConfigError, match="not signed by"):
        make_certificates(tmp_path / "a")
    c = make_certificates(tmp_path / "c")
    shutil.copy(b.server_key, c.server_key)  # the key of another certificate
    with pytest.raises(ConfigError, match="is not the key of"):
        make_certificates(tmp_path / "c")
    c.server_cert.write_text("not a certificate")
    with pytest.raises(ConfigError, match="unreadable PEM"):
        make_certificates(tmp_path / "c")
