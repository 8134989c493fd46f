"""The per-run error analysis and report (fedslim.server.run_report) on known inputs."""

from __future__ import annotations

import csv
import math

import numpy as np
import torch

from fedslim.report import (
    Central,
    CommReport,
    CommTotals,
    EvalMetrics,
    FinalReport,
    RoundReport,
    RunResults,
    load_results,
)
from fedslim.server.run_report import client_summary, confusion, write_run_report
from fedslim.task.arrays import ArrayData


class Fixed(torch.nn.Module):
    """Predicts class ``(x[0] + shift) % k``: a model whose confusion matrix is known."""

    def __init__(self, k: int, shift: int) -> None:
        super().__init__()
        self.k, self.shift = k, shift
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = (x[:, 0].long() + self.shift) % self.k
        return torch.nn.functional.one_hot(pred, self.k).float() + 0 * self.dummy


def _data(true: list[int], seen: list[int]) -> ArrayData:
    return ArrayData(np.array(seen, dtype=np.float32)[:, None], np.array(true))


def test_confusion_counts_per_class_and_most_confused():
    # true labels 0,0,1,1,2 ; the model predicts x[0] where x = [0, 1, 1, 2, 2]
    conf = confusion(Fixed(4, 0), _data([0, 0, 1, 1, 2], [0, 1, 1, 2, 2]), 4,
                     torch.device("cpu"))
    assert conf is not None
    assert conf.matrix == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert conf.per_class_accuracy[:3] == [0.5, 0.5, 1.0]
    assert math.isnan(conf.per_class_accuracy[3])  # class 3 absent from the split
    assert sorted(map(tuple, conf.most_confused)) == [(0, 1, 1), (1, 2, 1)]
    assert confusion(Fixed(4, 0), _data([], []), 4, torch.device("cpu")) is None


def test_client_summary_quantiles():
    s = client_summary(7, {f"p{i}": i / 10 for i in range(11)})
    assert s is not None and s.round == 7 and s.clients == 11
    assert (s.min, s.p10, s.median, s.max) == (0.0, 0.1, 0.5, 1.0)
    assert abs(s.mean - 0.5) < 1e-12
    assert client_summary(1, {}) is None


def _results(rounds: int) -> tuple[RunResults, FinalReport]:
    hist = [RoundReport(round=r, central=Central(EvalMetrics(0.1 * r, 1.0),
                                                 EvalMetrics(0.1 * r, 1.0)),
                        replies=3, comm=CommReport(uplink_bytes=100, uplink_none_bytes=1000,
                                                   downlink_bytes=50,
                                                   downlink_none_bytes=2000))
            for r in range(1, rounds + 1)]
    final = FinalReport(test_accuracy=0.3, test_loss=1.0, val_accuracy=0.3, val_loss=1.0,
                        rounds_completed=rounds, fl_seconds=1.0, model_file="model.safetensors",
                        model_file_bytes=1, comm=CommTotals.of(hist))
    res = RunResults(fedslim_version="x", config={"model": "m", "dataset": "d"},
                     started_at="t", wall_seconds=1.0, rounds=hist, final=final)
    return res, final


def test_report_files_hold_the_runs_figures(tmp_path):
    res, final = _results(3)
    final.confusion = confusion(Fixed(3, 1), _data([0, 1, 2], [0, 1, 2]), 3,
                                torch.device("cpu"))
    final.client_accuracy = client_summary(3, {"partition-0": 0.5, "partition-1": 0.7})
    (tmp_path / "results.json").write_text(res.to_json())
    files = write_run_report(tmp_path, res, final, {"partition-0": 0.5, "partition-1": 0.7})
    assert files == ["rounds.csv", "curves.png", "confusion.png", "clients.csv",
                     "clients.png", "report.md"]
    for name in files:
        assert (tmp_path / name).stat().st_size > 0
    rows = list(csv.DictReader((tmp_path / "rounds.csv").open()))
    assert [r["cumulative_bytes"] for r in rows] == ["150", "300", "450"]
    assert float(rows[-1]["cumulative_total_ratio"]) == 20.0  # 3000 plain / 150 sent
    md = (tmp_path / "report.md").read_text()
    assert "x20.0 vs float32" in md and "0 -> 1: 1" in md and "curves.png" in md
    assert load_results(tmp_path).final is not None  # results.json untouched, still valid


def test_a_run_without_rounds_still_gets_a_report(tmp_path):
    res, final = _results(0)
    files = write_run_report(tmp_path, res, final, {})
    assert files == ["rounds.csv", "report.md"]
