"""Following a deployment's run from outside: its results.json and `flwr run`'s log."""

from __future__ import annotations

import re
from pathlib import Path

from fedslim.deploy.processes import tail
from fedslim.report import ResultsError, RoundReport, RunResults, load_results

_RUN_ID = re.compile(r"Successfully started run (\d+)")


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _read_results(path: Path, stale: tuple[int, int, int] | None) -> RunResults | None:
    """``results.json`` once this run rewrote it (``stale``: its signature before), else None.

    The recorder replaces the file atomically, so every write changes inode and mtime.
    """
    sig = _signature(path)
    if sig is None or sig == stale:
        return None
    try:
        return load_results(path)
    except ResultsError:  # being replaced right now
        return None


def _run_id(log: Path) -> str | None:
    match = _RUN_ID.search(tail(log, 200))
    return match.group(1) if match else None


def _round_line(report: RoundReport, res: RunResults) -> str:
    total = res.config.get("num-server-rounds", "?")
    acc = f" | acc {report.central.test.accuracy:.4f}" if report.central else ""
    up = f" | up {report.comm.uplink_bytes / 1e6:.3f} MB" if report.comm else ""
    rejected = f" | {len(report.rejects)} rejected" if report.rejects else ""
    return f"round {report.round:>3}/{total}{acc}{up}{rejected} | {report.round_seconds:.2f}s"


def _progress(run_id: str | None, res: RunResults | None) -> str:
    if run_id is None:
        return "submitting the run"
    if res is None or not res.rounds:
        return f"run {run_id}: round 1 in progress"
    last = res.rounds[-1]
    total = res.config.get("num-server-rounds", "?")
    acc_s = f", test accuracy {last.central.test.accuracy:.4f}" if last.central else ""
    return f"run {run_id}: round {last.round}/{total} done{acc_s}"
