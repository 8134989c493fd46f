"""bench.comm without federations: the workload named in plot titles, and re-summarising a
stored runs.json (the keyframe runs of docs/results)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedslim.bench import comm
from fedslim.bench.entropy import summarise

ROOT = Path(__file__).resolve().parents[1]


def test_workload_names_the_overrides_or_the_defaults() -> None:
    assert comm.workload([]) == "digits_cnn on digits, dirichlet 0.5"
    assert comm.workload(["model = digits_wide", 'dataset="synthetic"',
                          "fraction-train=0.01"]) \
        == "digits_wide on synthetic, dirichlet 0.5, fraction-train 0.01"
    assert comm.workload(["partitioning=iid", "dirichlet-alpha=0.1"]) == \
        "digits_cnn on digits, iid"


def test_an_empty_summary_is_nan_not_infinitely_bad() -> None:
    empty = summarise([])
    assert all(math.isnan(v) for v in (empty.over_entropy, empty.nml_over_entropy,
                                       empty.floor))


def test_from_json_resummarises_and_replots(tmp_path: Path) -> None:
    stored = ROOT / "docs" / "results" / "partial_keyframes" / "digits_wide" / "runs.json"
    comm.main(["--from-json", str(stored), "--min-total-ratio", "5", "--out", str(tmp_path),
               "-c", "model=digits_wide", "-c", "dataset=synthetic",
               "-c", "fraction-train=0.01"])
    assert json.loads((tmp_path / "runs.json").read_text())["run_config"] == [
        "model=digits_wide", "dataset=synthetic", "fraction-train=0.01"]
    for name in ("runs.csv", "runs.json", "frontier_total.png", "frontier_uplink.png",
                 "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "runs.json").read_text())["summary"]
    chosen = [s["setting"] for s in summary if s["selected_total"]]
    assert chosen == ["x100 q2 both ways: down topk 5% + q4 + ans, keyframes every 16 (q8 + ans)"]
    assert summary == json.loads(stored.read_text())["summary"]
