"""Per-round records, the rich progress line, and ``results.json``.

``results.json`` is rewritten atomically after every round, so a crashed run still leaves a
valid file describing the rounds that completed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fedslim import __version__
from fedslim.server.storage import RESULTS_NAME, atomic_write_json


def _finite(x: Any) -> Any:
    """JSON has no NaN/Inf: map them to None, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


@dataclass
class RunRecorder:
    outdir: Path
    config: dict[str, Any]
    total_rounds: int
    info: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    progress: bool = True
    resumed_from_round: int | None = None
    console: Console = field(default_factory=lambda: Console(highlight=False, soft_wrap=True))

    def __post_init__(self) -> None:
        self.started = time.time()
        self._t_round = time.perf_counter()

    def start_round_clock(self) -> None:
        self._t_round = time.perf_counter()

    def record_round(self, rnd: int, row: dict[str, Any]) -> dict[str, Any]:
        """Add one round's record (round seconds measured since the last call)."""
        now = time.perf_counter()
        row = {"round": rnd, "round_seconds": now - self._t_round, **row}
        self._t_round = now
        self.history = [h for h in self.history if h["round"] != rnd] + [row]
        if self.progress:
            self.console.print(self.progress_line(row))
        return row

    def progress_line(self, row: dict[str, Any]) -> str:
        test = row.get("central", {}).get("test", {})
        parts = [f"[bold]round {row['round']:>3}/{self.total_rounds}[/bold]",
                 f"acc [green]{test.get('accuracy', float('nan')):.4f}[/green]",
                 f"loss {test.get('loss', float('nan')):.4f}"]
        comm = row.get("comm")
        if comm:
            parts.append(f"up {comm['uplink_bytes'] / 1e6:.3f} MB")
            down = comm["downlink_bytes"] + comm["downlink_eval_bytes"]
            parts.append(f"down {down / 1e6:.3f} MB")
            if comm.get("uplink_ratio"):
                parts.append(f"ratio x{comm['uplink_ratio']:.1f}")
        student = row.get("distill", {}).get("student_test_accuracy")
        if student is not None:
            parts.append(f"student {student:.4f}")
        parts.append(f"{row['round_seconds']:.2f}s")
        return " | ".join(parts)

    def results(self, final: dict[str, Any] | None = None) -> dict[str, Any]:
        return _finite({
            "fedslim_version": __version__,
            "config": self.config,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "wall_seconds": time.time() - self.started,
            "resumed_from_round": self.resumed_from_round,
            **self.info,
            "rounds": sorted(self.history, key=lambda h: h["round"]),
            "final": final,
        })

    def write(self, final: dict[str, Any] | None = None) -> Path:
        path = self.outdir / RESULTS_NAME
        atomic_write_json(path, self.results(final))
        return path
