"""A real Flower deployment on one machine: SuperLink + N SuperNodes as processes.

Unlike ``fedslim simulate`` (Flower's simulation engine, one process plus Ray), this starts
the same processes a multi-machine deployment runs, talking over loopback:

1. ``flower-superlink --insecure`` (deployment mode) on a free ``127.0.0.1`` port (with
   ``tls=True``: ``--ssl-*`` with a certificate from :mod:`fedslim.deploy.certs`). In
   Flower 1.41 one HTTP port serves the Fleet API (SuperNodes), the Control API (``flwr``)
   and the Runtime API (the ServerApp process).
2. ``flower-supernode --insecure --superlink 127.0.0.1:<port> --node-config
   "partition-id=i num-partitions=N" --port <free>`` for ``i < N`` (``--port`` is the node's
   own Runtime API for its ClientApp processes, so each node needs a distinct one).
3. Waits until the SuperLink lists N online nodes (``flwr supernode ls``).
4. Writes ``$FLWR_HOME/config.toml`` with a connection to the SuperLink and runs
   ``flwr run <app_dir> <connection> --run-config <file.toml> --stream``.
5. Waits for the ServerApp to write ``results.json`` with a non-null ``final``.

Whatever happens (errors, timeouts, Ctrl-C), every process started is stopped; see
:mod:`fedslim.deploy.processes` for how descendants in other sessions are found.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w
from rich.console import Console

from fedslim.config import RunConfig, parse_run_config
from fedslim.deploy.processes import DeployError, ProcessSet, free_ports, tail
from fedslim.deploy.progress import _progress, _read_results, _round_line, _run_id, _signature
from fedslim.preflight import (
    check_budget,
    check_data_dir,
    check_federation_size,
    check_init_from,
    check_output_dir,
    check_student,
)
from fedslim.protocol import RESULTS_FILE

if TYPE_CHECKING:  # imported when needed: `python -m fedslim.deploy.certs` runs it as main
    from fedslim.deploy.certs import CertPaths

__all__ = ["CONNECTION", "DeployError", "LocalDeployment", "default_app_dir",
           "run_local_deployment"]

CONNECTION = "fedslim-local"
SUPERLINK = "superlink"
FLWR_RUN = "flwr-run"
PathValue = str | int | float | bool


def default_app_dir() -> Path:
    """The Flower app to run: the fedslim source checkout if installed editable, else cwd."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and "[tool.flwr.app" in pyproject.read_text(errors="replace"):
        return root
    return Path.cwd()


def _executable(name: str) -> str:
    """A Flower console script, preferring the one next to this Python interpreter."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name!r} not found next to {sys.executable} or on PATH; "
                          "install flwr (pip install 'flwr[simulation]>=1.41,<1.42')")
    return found


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else path


def resolve_run_config(run_config: Mapping[str, PathValue]
                       ) -> tuple[RunConfig, dict[str, PathValue]]:
    """Validate ``run_config`` (fast, before any process starts) and make it sendable.

    Returns the parsed config and the overrides to send: only the given keys, typed as
    the app's defaults (so ``"0.1"`` from a CLI becomes ``0.1``), with ``output-dir`` (always
    sent) and ``data-dir`` made absolute: the ServerApp and ClientApps run in other
    processes with other working directories.
    """
    cfg = parse_run_config(overrides=run_config)
    out, _ = check_output_dir(cfg)  # created, `{run}` expanded (refused if taken)
    cfg = parse_run_config(overrides={**run_config, "output-dir": str(out)})
    flat = cfg.to_flat()
    send: dict[str, PathValue] = {k: flat[k] for k in run_config}
    send["output-dir"] = str(out)
    if cfg.data.data_dir:
        send["data-dir"] = _absolute(cfg.data.data_dir)
    if cfg.fed.init_from:
        send["init-from"] = _absolute(cfg.fed.init_from)
    return cfg, send


def _flwr_json(args: list[str], env: Mapping[str, str], timeout: float = 60
               ) -> dict[str, Any] | None:
    """Run a ``flwr ... --format json`` command; its JSON, or None if it failed."""
    try:
        proc = subprocess.run([_executable("flwr"), *args, "--format", "json"], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    start = proc.stdout.find("{")
    if start < 0:
        return None
    try:
        out = json.loads(proc.stdout[start:])
    except json.JSONDecodeError:
        return None
    return out if isinstance(out, dict) else None


class LocalDeployment:
    """SuperLink + ``num_clients`` SuperNodes on loopback, stopped when the ``with`` ends.

    Parameters
    ----------
    num_clients
        Number of SuperNodes; node ``i`` gets ``partition-id=i num-partitions=num_clients``.
    workdir
        Holds ``logs/`` (one file per process), ``flwr_home/`` and the run-config file.
    console
        Where status goes (stderr by default).
    tls
        Serve every API over TLS: a fresh CA and SuperLink certificate in ``workdir/certs``
        (:mod:`fedslim.deploy.certs`); SuperNodes and ``flwr`` verify it against the CA.
    """

    def __init__(self, num_clients: int, workdir: Path, console: Console | None = None,
                 min_nodes: int = 1, restart_nodes: bool = False, tls: bool = False) -> None:
        if num_clients < 1:
            raise DeployError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self.min_nodes = min_nodes          # the run goes on while this many SuperNodes live
        self.restart_nodes = restart_nodes  # start a SuperNode again when it dies
        self.node_args: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.lost: list[str] = []           # "supernode-i (exit code c)" for the report
        self.workdir = Path(workdir).expanduser().resolve()
        self.log_dir = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr_home"
        self.console = console or Console(stderr=True)
        self.port = 0
        self.tls = tls
        self.certs: CertPaths | None = None
        self.timings: dict[str, float] = {}  # phase -> seconds, for reports and docs
        self.env = self._environment()
        self.procs = ProcessSet(tag=str(self.workdir), log_dir=self.log_dir, cwd=self.workdir,
                                env=self.env)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)  # SuperLink/SuperNode exec flower-superexec
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env["FLWR_HOME"] = str(self.flwr_home)
        # Use this environment; do not `uv sync` a new one per run (see README).
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"  # no network calls
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        t0 = time.monotonic()
        left = self.procs.stop_all()
        self.timings["stop"] = time.monotonic() - t0
        if left and exc_type is None:
            raise DeployError(f"processes {left} were still running after cleanup; "
                              f"logs in {self.log_dir}")

    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.procs.procs]

    def check_nodes(self) -> None:
        """The SuperLink must live; a dead SuperNode is reported and restarted (if asked)
        or written off, and the run goes on while ``min_nodes`` remain."""
        self.procs.check_alive([SUPERLINK])
        live = {p.name: p for p in self.procs.procs if p.name in self.node_args}
        dead = [p for p in live.values() if p.exited() is not None]
        for p in dead:
            self.procs.procs.remove(p)
            self.lost.append(f"{p.name} (exit code {p.exited()})")
            if self.restart_nodes:
                self.console.print(f"[yellow]{p.name} died (exit code {p.exited()}); "
                                   "restarting it[/yellow]", soft_wrap=True)
                argv, env = self.node_args[p.name]
                self.procs.start(p.name, argv, extra_env=env)
            else:
                self.console.print(f"[yellow]{p.name} died (exit code {p.exited()}); "
                                   f"{len(live) - len(dead)} SuperNodes left[/yellow]",
                                   soft_wrap=True)
        alive = sum(1 for p in self.procs.procs if p.name in self.node_args)
        if alive < self.min_nodes:
            raise DeployError(f"only {alive} SuperNode(s) left, the run needs {self.min_nodes} "
                              f"(min-train-nodes); lost: {', '.join(self.lost)}; logs in "
                              f"{self.log_dir}")

    # -- steps -----------------------------------------------------------------------
    def start(self, deadline: float) -> None:
        """Start the SuperLink and the SuperNodes; return once all nodes are online."""
        t0 = time.monotonic()
        self.port, *node_ports = free_ports(1 + self.num_clients)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.tls:
            from fedslim.deploy.certs import make_certificates

            self.certs = make_certificates(self.workdir / "certs", force=True)
            link_security = ["--ssl-ca-certfile", str(self.certs.ca_cert),
                             "--ssl-certfile", str(self.certs.server_cert),
                             "--ssl-keyfile", str(self.certs.server_key)]
            node_security = ["--root-certificates", str(self.certs.ca_cert)]
        else:
            link_security = node_security = ["--insecure"]
        self._write_flwr_config()
        self.procs.start(SUPERLINK, [
            _executable("flower-superlink"), *link_security, "--host", "127.0.0.1",
            "--port", str(self.port), "--disable-runtime-dependency-installation"])
        self._wait_for_health(deadline)
        self.timings["superlink"] = time.monotonic() - t0
        threads = str(max(1, (os.cpu_count() or 1) // self.num_clients))
        for i, node_port in enumerate(node_ports):
            name = f"supernode-{i}"
            self.node_args[name] = ([
                _executable("flower-supernode"), *node_security,
                "--superlink", f"127.0.0.1:{self.port}",
                "--node-config", f"partition-id={i} num-partitions={self.num_clients}",
                "--host", "127.0.0.1", "--port", str(node_port)],
                # Own FLWR_HOME per node (each unpacks the app there); N trainers share
                # the CPU cores, so keep torch from oversubscribing them.
                {"FLWR_HOME": str(self.flwr_home / name),
                 "OMP_NUM_THREADS": self.env.get("OMP_NUM_THREADS", threads)})
            self.procs.start(name, self.node_args[name][0], extra_env=self.node_args[name][1])
        self._wait_for_nodes(deadline)
        self.timings["start"] = time.monotonic() - t0

    def _write_flwr_config(self) -> None:
        connection: dict[str, PathValue] = {"address": f"127.0.0.1:{self.port}"}
        if self.certs is not None:
            connection["root-certificates"] = str(self.certs.ca_cert)
        else:
            connection["insecure"] = True
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))

    def _wait_for_health(self, deadline: float) -> None:
        scheme = "https" if self.certs is not None else "http"
        url = f"{scheme}://127.0.0.1:{self.port}/health"
        context = (ssl.create_default_context(cafile=str(self.certs.ca_cert))
                   if self.certs is not None else None)
        with self.console.status(f"starting SuperLink on 127.0.0.1:{self.port}"):
            while True:
                self.procs.check_alive([SUPERLINK])
                try:
                    with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                        if resp.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
                self._check_deadline(deadline, "the SuperLink to answer on " + url)
                time.sleep(0.2)

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink lists as online (0 if it cannot be asked)."""
        out = _flwr_json(["supernode", "ls", CONNECTION], self.env)
        nodes = out.get("nodes", []) if out else []
        return sum(1 for n in nodes if n.get("status") == "online")

    def _wait_for_nodes(self, deadline: float) -> None:
        longrunning = [p.name for p in self.procs.procs]
        with self.console.status("waiting for SuperNodes") as status:
            while True:
                self.procs.check_alive(longrunning)
                online = self.online_nodes()
                status.update(f"SuperNodes online: {online}/{self.num_clients}")
                if online >= self.num_clients:
                    break
                self._check_deadline(deadline, f"{self.num_clients} SuperNodes to connect "
                                     f"({online} online)")
                time.sleep(0.5)
        secured = "TLS" if self.certs is not None else "insecure"
        self.console.print(f"[green]SuperLink 127.0.0.1:{self.port} ({secured}), "
                           f"{self.num_clients} SuperNodes online[/green]", soft_wrap=True)

    def run(self, app_dir: Path, send: Mapping[str, PathValue], results: Path,
            deadline: float) -> Path:
        """``flwr run`` the app; return ``results`` once it holds the final results."""
        config_file = self.workdir / "run-config.toml"
        config_file.write_text(tomli_w.dumps(dict(send)))
        stale = _signature(results)  # a results.json from an earlier run never counts
        t0 = time.monotonic()
        flwr_run = self.procs.start(FLWR_RUN, [
            _executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION,
            "--run-config", str(config_file), "--stream"])
        run_id: str | None = None
        ended_at: float | None = None
        shown = 0  # rounds already printed
        with self.console.status("submitting the run") as status:
            while True:
                res = _read_results(results, stale)
                for report in (res.rounds[shown:] if res is not None else []):
                    assert res is not None
                    self.console.print(_round_line(report, res), soft_wrap=True)
                    shown += 1
                if res is not None and res.final is not None:
                    self.timings["run"] = time.monotonic() - t0
                    self.console.print(f"[green]run {run_id} finished[/green] in "
                                       f"{self.timings['run']:.1f}s", soft_wrap=True)
                    return results
                self.check_nodes()
                run_id = run_id or _run_id(flwr_run.log)
                status.update(_progress(run_id, res))

                code = flwr_run.exited()
                if code not in (None, 0):
                    raise DeployError(f"`flwr run` exited with code {code}; see its log "
                                      f"{flwr_run.log}:\n{tail(flwr_run.log)}")
                if code == 0:  # the stream ends when the run ends: results are due now
                    ended_at = ended_at or time.monotonic()
                    state = self.run_status(run_id)
                    failed = state.startswith("finished") and state != "finished:completed"
                    if failed or time.monotonic() - ended_at > 30:
                        raise DeployError(self._no_results_message(run_id, state, results))
                self._check_deadline(deadline, f"run {run_id} to write final results "
                                     f"to {results}")
                time.sleep(0.5)

    connection = CONNECTION  # the SuperLink connection name in FLWR_HOME/config.toml

    def run_status(self, run_id: str | None) -> str:
        """The run's status as ``flwr ls`` reports it (e.g. ``finished:failed``)."""
        if run_id is None:
            return "unknown"
        out = _flwr_json(["ls", self.connection, "--run-id", run_id], self.env)
        runs = out.get("runs", []) if out else []
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def _no_results_message(self, run_id: str | None, state: str, results: Path) -> str:
        run_log = self.log_dir / (FLWR_RUN + ".log")
        return (f"run {run_id} ended (status: {state}) without final results in {results}; "
                f"the ServerApp's output is in {run_log} (and "
                f"{self.log_dir / (SUPERLINK + '.log')}), ClientApps' in "
                f"{self.log_dir}/supernode-*.log. End of {run_log}:\n{tail(run_log, 12)}")

    def _check_deadline(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise DeployError(f"timed out waiting for {what}; logs in {self.log_dir}")


def run_local_deployment(num_clients: int, run_config: Mapping[str, PathValue],
                         app_dir: Path, workdir: Path, timeout: float,
                         restart_nodes: bool = False, tls: bool = False) -> Path:
    """Run the app on a SuperLink + ``num_clients`` SuperNodes (real processes, loopback).

    Parameters
    ----------
    num_clients
        SuperNodes to start (node ``i`` trains partition ``i`` of ``num_clients``).
    run_config
        Run-config overrides (validated before anything starts); ``output-dir`` is where
        the results go (relative: against the current directory).
    app_dir
        The Flower app (directory with ``pyproject.toml``), e.g. :func:`default_app_dir`.
    workdir
        Logs (``logs/<process>.log``), ``flwr_home/`` and the run-config file.
    timeout
        Seconds for the whole deployment, start-up included.
    restart_nodes
        Start a SuperNode again if it dies; otherwise the run goes on with the others
        while at least ``min-train-nodes`` remain (the loss is reported).
    tls
        Every API over TLS with a fresh CA (see :class:`LocalDeployment`).

    Returns
    -------
    Path
        The ``results.json`` the ServerApp wrote, with non-null ``final``.

    Raises
    ------
    fedslim.errors.ConfigError
        A run-config key or value is invalid (nothing was started).
    DeployError
        A process failed or exited, or the timeout passed; the message names the process
        and its log file. Every started process is stopped before this propagates.
    """
    cfg, send = resolve_run_config(run_config)
    check_federation_size(cfg, num_clients)
    check_data_dir(cfg)
    check_budget(cfg)
    check_init_from(cfg)
    check_student(cfg)
    results = Path(str(send["output-dir"])) / RESULTS_FILE
    deadline = time.monotonic() + timeout
    dep = LocalDeployment(num_clients, workdir, min_nodes=cfg.fed.min_train_nodes,
                          restart_nodes=restart_nodes, tls=tls)
    with dep:
        dep.console.print(f"logs: {dep.log_dir}", soft_wrap=True)
        dep.start(deadline)
        dep.run(app_dir, send, results, deadline)
    dep.console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in dep.timings.items()),
                      soft_wrap=True)
    if dep.lost:
        dep.console.print(f"[yellow]SuperNodes lost during the run: {', '.join(dep.lost)}"
                          "[/yellow]", soft_wrap=True)
    return results
