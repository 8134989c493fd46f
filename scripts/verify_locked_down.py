"""Check docs/deployment.md's locked-down SuperLink on one host, with real processes.

    python scripts/verify_locked_down.py          # needs `nginx` on PATH

1. certificates from ``fedslim.deploy.certs``; SSH-format EC keys for 3 SuperNodes;
2. ``flower-superlink`` with TLS and ``--enable-supernode-auth``, bound to 127.0.0.1;
3. nginx (TLS) in front, forwarding only ``/v1/fleet/`` and ``/health``, 403 for the rest;
4. two nodes registered with ``flwr supernode register`` on the SuperLink host, a third
   ("intruder") not; all three connect through the proxy;
5. a 1-round fedslim run submitted on the SuperLink host.

Prints each check and exits 1 if one fails. Every process it starts is stopped (by PID,
plus a tagged sweep for Flower's own children); files go to a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedslim.deploy.certs import make_certificates
from fedslim.deploy.processes import ProcessSet, free_ports

ROOT = Path(__file__).resolve().parents[1]
NGINX = """worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{}}
http {{
    access_log {d}/nginx-access.log;
    client_body_temp_path {d}/nginx-tmp;
    client_max_body_size 64m;
    server {{
        listen 127.0.0.1:{proxy} ssl;
        ssl_certificate {d}/certs/server.crt; ssl_certificate_key {d}/certs/server.key;
        location /v1/fleet/ {{ proxy_pass https://127.0.0.1:{link}; }}
        location = /health  {{ proxy_pass https://127.0.0.1:{link}; }}
        location /          {{ return 403; }}
    }}
}}
"""


def _ssh_key(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


def main() -> int:
    if shutil.which("nginx") is None:
        print("error: nginx is not on PATH (apt-get install nginx-light)", file=sys.stderr)
        return 2
    d = Path(tempfile.mkdtemp(prefix="fedslim-locked-"))
    # nginx's workers (user nobody when started as root) buffer request bodies there.
    d.chmod(0o755)
    (d / "nginx-tmp").mkdir(mode=0o777)
    (d / "nginx-tmp").chmod(0o777)
    link, proxy, *node_ports = free_ports(5)
    certs = make_certificates(d / "certs", ["127.0.0.1"])
    ca = str(certs.ca_cert)
    nodes = ("node0", "node1", "intruder")
    for name in nodes:
        _ssh_key(d / name)
    (d / "nginx.conf").write_text(NGINX.format(d=d, proxy=proxy, link=link))
    (d / "home").mkdir()
    (d / "home" / "config.toml").write_text(tomli_w.dumps({"superlink": {
        "default": "local",
        "local": {"address": f"127.0.0.1:{link}", "root-certificates": ca},
        "proxy": {"address": f"127.0.0.1:{proxy}", "root-certificates": ca}}}))
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
               FLWR_HOME=str(d / "home"), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_DISABLE_UPDATE_CHECK="1", OMP_NUM_THREADS="1")
    procs = ProcessSet(tag=str(d), log_dir=d / "logs", cwd=d, env=env)
    context = ssl.create_default_context(cafile=ca)
    failures: list[str] = []

    def check(what: str, ok: bool, detail: str) -> None:
        print(f"[{'ok' if ok else 'FAIL'}] {what}: {detail}")
        if not ok:
            failures.append(what)

    def status(url: str) -> int | str:
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError) as exc:
            return type(exc).__name__

    def flwr(*args: str, timeout: float = 60) -> tuple[int, str]:
        p = subprocess.run([shutil.which("flwr", path=env["PATH"]) or "flwr", *args], env=env,
                           capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr

    try:
        procs.start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", ca, "--ssl-certfile",
            str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(link),
            "--disable-runtime-dependency-installation"])
        procs.start("nginx", ["nginx", "-c", str(d / "nginx.conf"), "-g", "daemon off;"])
        deadline = time.monotonic() + 60
        while status(f"https://127.0.0.1:{link}/health") != 200:
            procs.check_alive(["superlink", "nginx"])
            if time.monotonic() > deadline:
                raise TimeoutError("the SuperLink did not answer within 60 s")
            time.sleep(0.5)
        got = status(f"https://127.0.0.1:{proxy}/health")
        check("proxy forwards /health", got == 200, f"HTTP {got}")
        got = status(f"https://127.0.0.1:{proxy}/v1/control/list-runs")
        check("proxy refuses the Control API", got == 403, f"HTTP {got}")
        rc, out = flwr("supernode", "register", str(d / "node0.pub"), "proxy")
        check("`flwr supernode register` through the proxy fails", rc != 0, f"exit {rc}")
        for name in nodes[:2]:
            rc, out = flwr("supernode", "register", str(d / f"{name}.pub"), "local")
            check(f"register {name} on the SuperLink host", rc == 0, f"exit {rc}")
        for i, name in enumerate(nodes):
            procs.start(name, [
                "flower-supernode", "--root-certificates", ca,
                "--superlink", f"127.0.0.1:{proxy}", "--auth-supernode-private-key",
                str(d / name), "--node-config", f"partition-id={min(i, 1)} num-partitions=2",
                "--host", "127.0.0.1", "--port", str(node_ports[i])],
                extra_env={"FLWR_HOME": str(d / f"home-{name}")})
        deadline = time.monotonic() + 90
        online = 0
        while time.monotonic() < deadline:
            rc, out = flwr("supernode", "ls", "local", "--format", "json")
            listed = json.loads(out).get("nodes", []) if rc == 0 else []
            online = sum(1 for n in listed if n.get("status") == "online")
            if online >= 2:
                break
            time.sleep(1)
        time.sleep(5)  # give the intruder time to try (it retries every few seconds)
        rc, out = flwr("supernode", "ls", "local", "--format", "json")
        listed = json.loads(out).get("nodes", []) if rc == 0 else []
        online = sum(1 for n in listed if n.get("status") == "online")
        check("exactly the 2 registered SuperNodes are online", online == 2, f"{online}")
        access = (d / "nginx-access.log").read_text()
        refused = access.count("/v1/fleet/activate-node HTTP/1.1\" 412")
        check("the unregistered SuperNode is refused", refused >= 1,
              f"{refused} refused activate-node requests")
        t0 = time.monotonic()
        rc, out = flwr("run", str(ROOT), "local", "--run-config",
                       f"num-server-rounds=1 local-epochs=1 progress=false "
                       f"min-available-nodes=2 output-dir='{d / 'out'}'",
                       "--stream", timeout=500)
        results = d / "out" / "results.json"
        res = json.loads(results.read_text()) if results.exists() else {}
        final, rounds = res.get("final"), res.get("rounds", [])
        replies = [r["replies"] for r in rounds]
        check("a 1-round run through the proxy finishes with both replies",
              rc == 0 and final is not None and replies == [2],
              f"exit {rc}, {time.monotonic() - t0:.0f} s, replies {replies}, test accuracy "
              f"{final['test_accuracy'] if final else None}")
    finally:
        left = procs.stop_all()
        check("no process left", not left, f"{left}")
    print(f"files: {d}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
