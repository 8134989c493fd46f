"""``flwr run`` against a simulation-mode SuperLink that we start, track and stop.

``flwr run .`` with Flower's default ``local`` connection starts a detached SuperLink on a
fixed port (39091) that outlives the command and is shared by every later ``flwr run`` on
the machine. For tests and benchmarks fedslim starts its own instead: ``flower-superlink
--simulation`` on a free loopback port, as a child in a :class:`ProcessSet` (so it and
everything it spawns are stopped when the ``with`` block ends), and a throw-away
``FLWR_HOME`` whose ``config.toml`` points a connection at it::

    with LocalSimulation(workdir) as sim:
        sim.run(app_dir, {"num-server-rounds": 3}, num_supernodes=10, timeout=600)
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import tomli_w

from fedslim.deploy.launcher import LocalDeployment, PathValue, _executable
from fedslim.deploy.processes import DeployError, free_ports, tail

CONNECTION = "fedslim-sim"


class LocalSimulation(LocalDeployment):
    """A simulation-mode SuperLink on a free port; ``run`` submits apps with ``flwr run``."""

    connection = CONNECTION

    def __init__(self, workdir: Path) -> None:
        super().__init__(num_clients=1, workdir=workdir)

    def __enter__(self) -> LocalSimulation:
        super().__enter__()
        self.start_link(time.monotonic() + 120)
        return self

    def start_link(self, deadline: float) -> None:
        (self.port,) = free_ports(1)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": CONNECTION, CONNECTION: {
            "address": f"127.0.0.1:{self.port}", "insecure": True}}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))
        self.procs.start("superlink", [
            _executable("flower-superlink"), "--insecure", "--simulation",
            "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation"])
        self._wait_for_health(deadline)

    def run(self, app_dir: Path, run_config: Mapping[str, PathValue],  # type: ignore[override]
            num_supernodes: int, timeout: float = 600, echo: bool = False,
            done: Callable[[], bool] | None = None) -> str:
        """``flwr run`` the app in simulation with ``num_supernodes`` nodes; wait for its end.

        ``--stream`` can end before the ServerApp has written its last file: ``done``
        (e.g. "results.json has final results") is then polled for up to 120 s more.
        Returns the command's output (also in ``logs/flwr-run.log``; printed as it comes
        with ``echo``). Raises :class:`DeployError` if it fails or times out.
        """
        config_file = self.workdir / "run-config.toml"
        config_file.write_text(tomli_w.dumps(dict(run_config)))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [_executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION,
               "--run-config", str(config_file), "--federation-config",
               f"num-supernodes={num_supernodes}", "--stream"]
        flwr_run = self.procs.start("flwr-run", cmd)
        deadline = time.monotonic() + timeout
        printed = 0
        while (code := flwr_run.exited()) is None:
            if echo:
                printed = _echo_new(flwr_run.log, printed)
            if time.monotonic() > deadline:
                raise DeployError(f"`flwr run` did not finish within {timeout:.0f}s; log: "
                                  f"{flwr_run.log}\n{tail(flwr_run.log)}")
            time.sleep(0.2)
        if echo:
            _echo_new(flwr_run.log, printed)
        if code != 0:
            raise DeployError(f"`flwr run` exited with code {code}; log: {flwr_run.log}\n"
                              f"{tail(flwr_run.log)}")
        self._check_completed(flwr_run.log)
        until = time.monotonic() + 120
        while done is not None and not done():
            self.procs.check_alive(["superlink"])
            if time.monotonic() > until:
                raise DeployError(f"`flwr run` ended but the app's output is not there after "
                                  f"120 s; logs in {self.log_dir}\n{tail(flwr_run.log)}")
            time.sleep(0.5)
        return flwr_run.log.read_text(errors="replace")


    def _check_completed(self, log: Path, wait: float = 30.0) -> None:
        """``flwr run --stream`` exits 0 when the ServerApp failed: ask the SuperLink how
        the run ended and raise unless it completed (its status settles within ``wait``)."""
        match = re.search(r"Successfully started run (\d+)", log.read_text(errors="replace"))
        if match is None:
            return  # no run id printed: nothing to ask (the exit code was 0)
        run_id, until = match.group(1), time.monotonic() + wait
        state = self.run_status(run_id)
        while not state.startswith("finished") and time.monotonic() < until:
            time.sleep(0.5)
            state = self.run_status(run_id)
        if state.startswith("finished") and state != "finished:completed":
            raise DeployError(f"run {run_id} ended with status {state}; log: {log}\n"
                              f"{tail(log)}")


def _echo_new(log: Path, printed: int) -> int:
    """Print what ``log`` gained since byte ``printed``; return the new offset."""
    try:
        with open(log, "rb") as fh:
            fh.seek(printed)
            data = fh.read()
    except OSError:
        return printed
    end = data.rfind(b"\n") + 1  # whole lines only
    if end:
        sys.stdout.write(data[:end].decode(errors="replace"))
        sys.stdout.flush()
    return printed + end
