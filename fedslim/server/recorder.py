"""Per-round records, the rich progress line, and ``results.json``.

``results.json`` is rewritten atomically after every round from a typed
:class:`~fedslim.report.RunResults`, so a crashed run still leaves a valid file describing
the rounds that completed; :func:`fedslim.report.load_results` reads it back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fedslim import __version__
from fedslim.config import RunConfig
from fedslim.console import FRAMEWORK_LOG
from fedslim.protocol import CHECKPOINT_FILE, RESULTS_FILE
from fedslim.report import CommTotals, FinalReport, RoundReport, RunResults
from fedslim.server.storage import atomic_write_bytes


@dataclass
class RunRecorder:
    outdir: Path
    config: dict[str, Any]
    total_rounds: int
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    history: list[RoundReport] = field(default_factory=list)
    progress: bool = True
    resumed_from_round: int | None = None
    console: Console = field(default_factory=lambda: Console(highlight=False, soft_wrap=True))

    def __post_init__(self) -> None:
        self.started = time.time()
        self._t_round = time.perf_counter()

    def start_round_clock(self) -> None:
        self._t_round = time.perf_counter()

    def round_seconds(self) -> float:
        """Seconds since the last call (or the clock's start): one round's wall time."""
        now = time.perf_counter()
        seconds, self._t_round = now - self._t_round, now
        return seconds

    def record_round(self, report: RoundReport) -> None:
        self.history = [h for h in self.history if h.round != report.round] + [report]
        if self.progress:
            self.console.print(self.progress_line(report))

    def progress_line(self, r: RoundReport) -> str:
        parts = [f"[bold]round {r.round:>3}/{self.total_rounds}[/bold]"]
        if r.central is not None:
            parts += [f"acc [green]{r.central.test.accuracy:.4f}[/green]",
                      f"loss {r.central.test.loss:.4f}"]
        if r.comm is not None:
            parts.append(f"up {r.comm.uplink_bytes / 1e6:.3f} MB")
            parts.append(f"down {(r.comm.downlink_bytes + r.comm.downlink_eval_bytes) / 1e6:.3f}"
                         " MB")
            if r.comm.uplink_ratio:
                parts.append(f"up x{r.comm.uplink_ratio:.1f}")
            total = self._total_ratio()
            if total:
                parts.append(f"total x{total:.1f} so far")
        if r.rejects:
            parts.append(f"[yellow]{len(r.rejects)} rejected[/yellow]")
        if r.silent:
            parts.append(f"[yellow]{r.silent} silent[/yellow]")
        left_out = sum(d.action == "weight-zero" for d in r.defences)
        if left_out:
            parts.append(f"{left_out} left out")
        if not r.aggregated:
            parts.append("[red]no update: no valid train reply[/red]")
        if r.distill is not None:
            parts.append(f"student {r.distill.student_test_accuracy:.4f} "
                         f"(distil {r.distill.distill_seconds:.2f}s)")
        parts.append(f"{r.round_seconds:.2f}s")
        return " | ".join(parts)

    def _total_ratio(self) -> float | None:
        """All traffic so far, both directions, against plain float32 (cumulative: the
        first round's full model is the largest message of a run)."""
        totals = CommTotals.of(self.history)
        return totals.total_ratio if totals is not None else None

    def print_header(self, cfg: RunConfig, start_round: int) -> None:
        self.console.print(
            f"[bold]fedslim[/bold]: {cfg.train.model} on {cfg.data.dataset}, "
            f"{cfg.data.partitioning} partitions, strategy {cfg.fed.strategy}, uplink "
            f"{cfg.comp.uplink}, rounds {start_round + 1}..{cfg.fed.num_server_rounds}")

    def print_summary(self, final: FinalReport, report_files: list[str] | None = None
                      ) -> None:
        """One summary: the figures, and every file written."""
        parts = [f"test accuracy {final.test_accuracy:.4f}"]
        if final.confusion is not None and final.confusion.most_confused:
            true, pred, count = final.confusion.most_confused[0]
            parts.append(f"most confused {true}->{pred} ({count}x)")
        if final.comm is not None and final.comm.uplink_ratio:
            parts.append(f"uplink x{final.comm.uplink_ratio:.1f}")
        if final.comm is not None and final.comm.total_ratio:
            parts.append(f"all traffic {final.comm.total_bytes / 1e6:.3f} MB = "
                         f"x{final.comm.total_ratio:.1f} less than plain float32")
        if final.student is not None:
            parts.append(f"student {final.student.test_accuracy:.4f} "
                         f"({final.student.params:,} params; int8 copy "
                         f"{final.student.int8_test_accuracy:.4f})")
        if final.best is not None and final.best.model_file:
            parts.append(f"best round {final.best.round} (val {final.best.val_accuracy:.4f}, "
                         f"test {final.best.test_accuracy:.4f})")
        style = "red" if final.error else "bold"
        self.console.print(f"[{style}]done[/{style}]: " + ", ".join(parts))
        if final.error:
            self.console.print(f"[red]error[/red]: {final.error}")
        if final.stopped_early:
            self.console.print(f"early stop: {final.stopped_early}")
        files = [RESULTS_FILE, final.model_file, CHECKPOINT_FILE]
        if final.best is not None and final.best.model_file:
            files.append(final.best.model_file)
        if final.student is not None:
            files += [final.student.file, final.student.int8_file]
        files += report_files or []
        if (self.outdir / FRAMEWORK_LOG).exists():
            files.append(f"{FRAMEWORK_LOG} (Flower/Ray logs)")
        self.console.print(f"wrote {self.outdir}/: " + ", ".join(files))

    def results(self, final: FinalReport | None = None) -> RunResults:
        return RunResults(
            fedslim_version=__version__, config=self.config,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            wall_seconds=time.time() - self.started,
            resumed_from_round=self.resumed_from_round, model=self.model, data=self.data,
            rounds=sorted(self.history, key=lambda h: h.round), final=final)

    def write(self, final: FinalReport | None = None) -> Path:
        path = self.outdir / RESULTS_FILE
        atomic_write_bytes(path, self.results(final).to_json().encode())
        return path
