"""Start long-running processes with their own log files, and always stop all of them.

A Flower deployment is a tree of processes: ``flower-superlink`` and every
``flower-supernode`` start a ``flower-superexec`` in a *new session* (so it is not in their
process group), which in turn starts ``flwr-serverapp`` / ``flwr-clientapp`` processes.
Killing the process groups we started is therefore not enough. Every process we start
gets an environment variable ``FEDSLIM_DEPLOY_TAG=<tag>``; children inherit it, so after
stopping our groups we scan ``/proc`` for anything still carrying the tag and stop that too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedslim.errors import FedslimError

TAG_ENV = "FEDSLIM_DEPLOY_TAG"
_PR_SET_PDEATHSIG = 1


class DeployError(FedslimError):
    """A process of a local deployment failed to start, died, or timed out."""


def _linux_prctl() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _linux_prctl()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # If the launcher is killed with SIGKILL (no finally runs), the kernel sends SIGTERM
    # to the SuperLink/SuperNodes; their SuperExecs exit when their parent disappears.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)  # type: ignore[operator]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that are free on ``host`` right now.

    All sockets stay bound until every port is chosen, so the ports differ; another
    program may still take one before we use it (a failed bind then shows in the log).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ("" if it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def tagged_processes(tag: str, variable: str = TAG_ENV) -> list[int]:
    """PIDs of live (non-zombie) processes whose environment has ``variable=tag``.

    Linux only (reads ``/proc``); returns ``[]`` elsewhere. Our own process is excluded.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    needle = f"{variable}={tag}".encode()
    me = os.getpid()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and not _is_zombie(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def descendants(root: int) -> set[int]:
    """PIDs of every live process below ``root`` in the process tree (Linux; else empty)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def freeze_tree(tag: str, root: int | None = None) -> list[int]:
    """SIGSTOP every process below ``root`` (default: this one) or carrying ``tag``.

    A stopped process cannot start another, so repeated scans converge on the whole set.
    Both ways of finding them are needed: a process re-parented to init is found only by
    its tag, and one that overwrote its environment (``setproctitle`` does, so Ray's
    agents and workers can lose the tag) only through its parent. Returns the PIDs.
    """
    me = os.getpid() if root is None else root
    stopped: set[int] = set()
    for _ in range(100):
        new = (set(tagged_processes(tag)) | descendants(me)) - stopped - {os.getpid()}
        if not new:
            break
        _signal_pids(sorted(new), signal.SIGSTOP)
        stopped |= new
    return sorted(stopped)


def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_tagged(tag: str, grace: float = 3.0, settle: float = 10.0) -> list[int]:
    """Stop every live process carrying ``tag``; return any still alive at the end.

    SIGTERM to all, up to ``grace`` s for them to exit, then SIGKILL sweeps until two
    scans 0.3 s apart find nothing (for at most ``settle`` s): a process can appear after
    the first scan (Ray's raylet starts its agents while it shuts down), so one scan is
    not enough.
    """
    left = tagged_processes(tag)
    _signal_pids(left, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = tagged_processes(tag)
    end = time.monotonic() + settle
    quiet = 0
    while quiet < 2 and time.monotonic() < end:
        left = tagged_processes(tag)
        if left:
            _signal_pids(left, signal.SIGKILL)
            quiet = 0
        else:
            quiet += 1
        time.sleep(0.3)
    return tagged_processes(tag)


@dataclass
class Launched:
    """One process we started: its name (for messages), handle and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def exited(self) -> int | None:
        return self.popen.poll()


@dataclass
class ProcessSet:
    """Processes started for one deployment, all tagged with ``tag``.

    Use as a context manager (or call :meth:`stop_all` in a ``finally``): leaving it stops
    every process it started and every descendant still carrying the tag.
    """

    tag: str
    log_dir: Path
    cwd: Path
    env: Mapping[str, str]
    procs: list[Launched] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str],
              extra_env: Mapping[str, str] | None = None) -> Launched:
        """Start ``argv`` in its own session, output to ``<log_dir>/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        env = {**self.env, **(extra_env or {}), TAG_ENV: self.tag}
        with open(log, "ab") as out:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            try:
                popen = subprocess.Popen(
                    list(argv), cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=_die_with_parent if _PRCTL is not None else None)
            except OSError as exc:
                raise DeployError(f"cannot start {name} ({argv[0]}): {exc}") from None
        launched = Launched(name, popen, log)
        self.procs.append(launched)
        return launched

    def check_alive(self, names: Collection[str] | None = None) -> None:
        """Raise :class:`DeployError` naming the first process (of ``names``) that exited."""
        for p in self.procs:
            if names is not None and p.name not in names:
                continue
            code = p.exited()
            if code is not None:
                raise DeployError(
                    f"{p.name} exited with code {code}; see its log {p.log}:\n{tail(p.log)}")

    def stop_all(self, grace: float = 10.0) -> list[int]:
        """Stop everything (SIGTERM, then SIGKILL after ``grace`` s); return stragglers.

        Returns the PIDs of tagged processes that were still alive after SIGKILL (should be
        empty; a caller may report them).
        """
        # Remember the whole tree now: once a parent dies, its children are re-parented
        # and only the tag finds them.
        running = [p for p in self.procs if p.exited() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in running:
            try:
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        # Descendants in other sessions (SuperExec, ServerApp/ClientApp processes).
        left = stop_tagged(self.tag, grace=min(grace, 5.0))
        for p in self.procs:  # reap, so nothing stays a zombie of ours
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=1)
        return left

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
