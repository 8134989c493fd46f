"""End-to-end: a real deployment (SuperLink + SuperNodes as processes, gRPC/HTTP on loopback).

Every test checks that nothing it launched is left running: processes started by the
launcher (and their descendants in other sessions) carry ``FEDSLIM_DEPLOY_TAG=<workdir>``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedslim.deploy import DeployError, LocalDeployment, run_local_deployment, tagged_processes
from fedslim.errors import ConfigError
from tests.e2e.helpers import ROOT

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _kill_leftovers(tag: str) -> list[int]:
    """Return (and kill, so a failing test still cleans up) processes carrying ``tag``."""
    left = tagged_processes(tag)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def test_three_supernodes_two_rounds_on_loopback_over_tls(tmp_path: Path) -> None:
    """Every API over TLS (a fresh CA); the insecure path runs in the kill -9 test below."""
    workdir = tmp_path / "deploy"
    outdir = tmp_path / "out"
    try:
        results = run_local_deployment(
            3, {"num-server-rounds": 2, "output-dir": str(outdir), "progress": False,
                "local-epochs": 1, "uplink": "none"},  # learning in 2 rounds: see below
            app_dir=ROOT, workdir=workdir, timeout=900, tls=True)
    finally:
        left = _kill_leftovers(str(workdir.resolve()))
    assert left == [], f"processes left running: {left}"
    assert results == outdir / "results.json"
    res = json.loads(results.read_text())
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    for r in res["rounds"]:
        assert r["replies"] == 3 and r["failures"] == 0
    # Plain FedAvg passes 0.2 after 2 rounds; `auto` starts slower (it releases 40% of an
    # update's energy per round, the rest through error feedback; docs/compression.md) and
    # is the transport in the kill -9 test below.
    assert res["final"]["test_accuracy"] > 0.2  # chance is 0.1
    logs = {p.name for p in (workdir / "logs").iterdir()}
    assert logs == {"superlink.log", "flwr-run.log", "supernode-0.log", "supernode-1.log",
                    "supernode-2.log"}
    connection = (workdir / "flwr_home" / "config.toml").read_text()
    assert "root-certificates" in connection and "insecure" not in connection
    assert "--insecure" not in (workdir / "logs" / "superlink.log").read_text()


def test_failed_run_names_the_log_and_stops_everything(tmp_path: Path) -> None:
    """`flwr run` on a directory that is no Flower app: a DeployError pointing to the log."""
    workdir = tmp_path / "deploy"
    not_an_app = tmp_path / "empty"
    not_an_app.mkdir()
    tag = str(workdir.resolve())
    try:
        with pytest.raises(DeployError, match=r"flwr-run\.log"):  # noqa: PT012
            with LocalDeployment(2, workdir) as dep:
                dep.start(deadline=_deadline(120))
                pids = dep.pids()
                # SuperLink, 2 SuperNodes, plus their SuperExecs (other sessions).
                assert len(tagged_processes(tag)) >= 3
                dep.run(not_an_app, {"output-dir": str(tmp_path / "out")},
                        tmp_path / "out" / "results.json", deadline=_deadline(120))
    finally:
        left = _kill_leftovers(tag)
    assert left == [], f"processes left running: {left}"
    assert not any(_alive(p) for p in pids)


def test_bad_config_fails_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="partitioning"):
        run_local_deployment(2, {"partitioning": "random"}, ROOT, tmp_path / "w", 60)
    with pytest.raises(ConfigError, match="min-available-nodes"):
        run_local_deployment(1, {}, ROOT, tmp_path / "w", 60)
    assert not (tmp_path / "w").exists()


def test_results_from_an_earlier_run_never_count(tmp_path: Path) -> None:
    from fedslim.deploy.launcher import _read_results, _signature
    from fedslim.server.storage import atomic_write_json

    path = tmp_path / "results.json"
    base = {"fedslim_version": "x", "config": {}, "started_at": "t", "wall_seconds": 1.0}
    assert _read_results(path, None) is None
    atomic_write_json(path, {**base, "final": None, "rounds": [{"round": 1}]})
    stale = _signature(path)
    assert _read_results(path, stale) is None  # the old file never counts
    atomic_write_json(path, {**base, "final": None})
    res = _read_results(path, stale)
    assert res is not None and res.final is None and res.rounds == []


COMPOSE_DIR = ROOT / "docker"


def _engine_up(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _compose_command() -> list[str] | None:
    """podman-compose or `docker compose`, if one is installed *and* has a working engine."""
    if shutil.which("podman-compose") and _engine_up(["podman", "info"]):
        return ["podman-compose"]
    if shutil.which("docker") and _engine_up(["docker", "info"]) and _engine_up(
            ["docker", "compose", "version"]):
        return ["docker", "compose"]
    return None


@pytest.mark.slow
@pytest.mark.parametrize("compose_file", ["compose.yaml", "compose.tls.yaml"])
def test_compose_deployment(tmp_path: Path, compose_file: str) -> None:
    """docker/compose.yaml (plain) and compose.tls.yaml (every API over TLS): build, 3
    SuperNodes, a 2-round run, as the image's unprivileged user. Opt-in: it builds a ~2 GB
    image. Set FEDSLIM_TEST_COMPOSE=1 (and BASE_IMAGE if python:3.11-slim cannot be
    pulled; docker/wheels/ for an offline build); see docs/deployment.md."""
    if os.environ.get("FEDSLIM_TEST_COMPOSE") != "1":
        pytest.skip("set FEDSLIM_TEST_COMPOSE=1 to build the image and run compose")
    compose = _compose_command()
    if compose is None:
        pytest.skip("no podman-compose/podman or docker compose with a running engine")
    out = tmp_path / "outputs"
    out.mkdir()
    out.chmod(0o777)  # docs/deployment.md: writable for the containers' user (uid 10001)
    env = dict(os.environ, FEDSLIM_OUTPUTS=str(out))
    project = f"fedslim-test-{os.getpid()}"
    base = [*compose, "-p", project, "-f", compose_file]

    def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], cwd=COMPOSE_DIR, env=env, capture_output=True,
                              text=True, timeout=timeout)

    try:
        for step in (("build", "superlink"),
                     ("up", "-d", "superlink", "supernode-0", "supernode-1", "supernode-2"),
                     ("run", "--rm", "-T", "--no-deps", "run")):
            proc = run(*step)
            assert proc.returncode == 0, f"{step}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    finally:
        run("down", "-v", timeout=300)  # -v: the TLS file's certificate volume too
        if compose == ["podman-compose"]:  # podman-compose 1.0 leaves the network behind
            subprocess.run(["podman", "network", "rm", "-f", f"{project}_default"],
                           capture_output=True, timeout=60)
    results = out / "results.json"
    res = json.loads(results.read_text())
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert all(r["replies"] == 3 for r in res["rounds"])
    assert res["final"]["test_accuracy"] > 0.2
    # Written by the unprivileged user, readable by anyone (not root:root 0600).
    assert results.stat().st_uid == 10001 and results.stat().st_mode & 0o044 == 0o044
    # (compose.tls.yaml: the SuperNodes and `flwr run` are configured with
    # --root-certificates / root-certificates only, so finishing proves TLS worked.)


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def test_a_supernode_killed_mid_run_does_not_stop_the_deployment(tmp_path: Path) -> None:
    """kill -9 of one of three SuperNodes after round 1: the run finishes with the others
    (min-train-nodes=2), and the loss is reported."""
    import threading

    workdir, outdir = tmp_path / "deploy", tmp_path / "out"
    send = {"num-server-rounds": 3, "output-dir": str(outdir), "progress": False,
            "local-epochs": 1, "round-timeout": 120.0}  # ~5 s idle, ~100 s on a loaded 2 cores
    dep = LocalDeployment(3, workdir, min_nodes=2)
    outcome: dict[str, object] = {}
    try:
        with dep:
            deadline = time.monotonic() + 900
            dep.start(deadline)

            def run() -> None:
                try:
                    outcome["results"] = dep.run(ROOT, send, outdir / "results.json",
                                                 deadline)
                except Exception as exc:  # reported below
                    outcome["error"] = exc

            runner = threading.Thread(target=run)
            runner.start()
            while not _rounds(outdir) and runner.is_alive():
                time.sleep(0.5)
            victim = next(p for p in dep.procs.procs if p.name == "supernode-0")
            os.kill(victim.popen.pid, signal.SIGKILL)  # a PID we started
            runner.join(timeout=900)
    finally:
        left = _kill_leftovers(str(workdir.resolve()))
    assert left == []
    assert "error" not in outcome, outcome.get("error")
    res = json.loads((outdir / "results.json").read_text())
    assert res["final"] is not None and [r["round"] for r in res["rounds"]] == [1, 2, 3]
    last = res["rounds"][-1]
    assert last["replies"] == 2, (last["rejects"], last["failures"], last["round_seconds"])
    assert any("supernode-0" in lost for lost in dep.lost)


def _rounds(outdir: Path) -> int:
    try:
        return len(json.loads((outdir / "results.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0
