"""Shared fixtures: keep Flower's home and all outputs inside pytest's tmp dirs, and make
sure the suite leaves no process behind.

Every process a test starts (directly, through Ray, or detached by Flower's CLI) inherits
``FEDSLIM_TEST_SESSION`` from this pytest process. At the end of the session the fixture
below looks for live processes carrying this session's value: there must be none. Any it
finds were started by this session (that is what the marker proves), so it stops exactly
those and fails the session, naming them.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
SESSION_ENV = "FEDSLIM_TEST_SESSION"
# Per pytest process (xdist workers get their own): children inherit it from here on.
os.environ[SESSION_ENV] = f"{os.getpid()}-{uuid.uuid4().hex}"


def session_processes() -> dict[int, str]:
    """Live, non-zombie processes (other than this one) started under this session."""
    needle = f"{SESSION_ENV}={os.environ[SESSION_ENV]}".encode()
    found = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry.name)] = cmd[:120]
    return found


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 15  # processes that are shutting down get some time
    left = session_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = session_processes()
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"the test session left {len(left)} process(es) running (stopped now): "
                    + "; ".join(f"{pid}: {cmd}" for pid, cmd in sorted(left.items())))


@pytest.fixture(autouse=True)
def _flwr_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)
