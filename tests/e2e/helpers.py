"""Run fedslim / flwr as real subprocesses and always clean up what they start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_fedslim(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "fedslim.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"fedslim {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def simulate(outdir: Path, num_clients: int, rounds: int, *extra: str,
             timeout: float = 600) -> dict[str, Any]:
    run_fedslim(["simulate", "--num-clients", str(num_clients), "--rounds", str(rounds),
                 "--output-dir", str(outdir), "-c", "progress=false", *extra], timeout)
    return json.loads((outdir / "results.json").read_text())
