"""Run one real federation (``fedslim simulate`` in a subprocess) and return its results."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedslim.report import RunResults, load_results


def simulate_subprocess(overrides: dict[str, Any], num_clients: int, rounds: int,
                        extra: list[str] | None = None) -> tuple[RunResults, float]:
    """Run a simulation with these run-config overrides; return (results.json, wall s)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedslim.cli", "simulate", "--num-clients",
               str(num_clients), "--rounds", str(rounds), "--output-dir", tmp,
               "-c", "progress=false"]
        for k, v in overrides.items():
            cmd += ["-c", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
        for item in extra or []:
            cmd += ["-c", item]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"simulate {overrides} failed:\n{proc.stderr[-3000:]}")
        return load_results(Path(tmp)), wall
