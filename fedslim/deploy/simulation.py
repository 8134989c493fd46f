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

import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from fedslim.deploy.launcher import LocalDeployment, PathValue, _executable
from fedslim.deploy.processes import DeployError, free_ports, tail

CONNECTION = "fedslim-sim"


class LocalSimulation(LocalDeployment):
    """A simulation-mode SuperLink on a free port; ``run`` submits apps with ``flwr run``."""

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
            num_supernodes: int, timeout: float = 600) -> str:
        """``flwr run`` the app in simulation with ``num_supernodes`` nodes; wait for its end.

        Returns the command's output. Raises :class:`DeployError` if it fails or times out.
        """
        config_file = self.workdir / "run-config.toml"
        config_file.write_text(tomli_w.dumps(dict(run_config)))
        cmd = [_executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION,
               "--run-config", str(config_file), "--federation-config",
               f"num-supernodes={num_supernodes}", "--stream"]
        log = self.log_dir / "flwr-run.log"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            try:
                proc = subprocess.run(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                      timeout=timeout, cwd=self.workdir)
            except subprocess.TimeoutExpired:
                raise DeployError(f"`flwr run` did not finish within {timeout:.0f}s; log: "
                                  f"{log}\n{tail(log)}") from None
        if proc.returncode != 0:
            raise DeployError(f"`flwr run` exited with code {proc.returncode}; log: {log}\n"
                              f"{tail(log)}")
        return log.read_text(errors="replace")
