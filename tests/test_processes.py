"""The process-tree helpers the launchers stop their processes with (Linux /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedslim.deploy.processes import TAG_ENV, descendants, freeze_tree, stop_tagged

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

# A child that starts a grandchild and waits: the grandchild is found through its parent.
_TREE = ("import subprocess, sys, time; "
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
         "time.sleep(60)")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


def _wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_freeze_tree_finds_grandchildren_and_stops_them() -> None:
    child = subprocess.Popen([sys.executable, "-c", _TREE])
    try:
        _wait_for(lambda: len(descendants(child.pid)) == 1)
        (grandchild,) = descendants(child.pid)
        assert descendants(os.getpid()) >= {child.pid, grandchild}
        frozen = freeze_tree(tag=f"unused-{uuid.uuid4().hex}", root=child.pid)
        assert frozen == [grandchild]  # the root itself is the caller's business
        _wait_for(lambda: _state(grandchild) == "T")
        assert _state(grandchild) == "T"
        os.kill(grandchild, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()


def test_stop_tagged_stops_exactly_the_tagged_processes() -> None:
    tag = f"test-{uuid.uuid4().hex}"
    tagged = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, TAG_ENV: tag})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert stop_tagged(tag, grace=2.0, settle=2.0) == []
        assert tagged.wait(timeout=5) == -signal.SIGTERM
        assert other.poll() is None  # an untagged process is left alone
    finally:
        for p in (tagged, other):
            p.kill()
            p.wait()
