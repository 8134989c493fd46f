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
    data = json.loads(stored.read_text())
    comm.main(["--from-json", str(stored), "--min-total-ratio", "5", "--out", str(tmp_path),
               "-c", "model=ignored"])
    for name in ("runs.csv", "runs.json", "frontier_total.png", "frontier_uplink.png",
                 "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    redone = json.loads((tmp_path / "runs.json").read_text())
    assert redone["run_config"] == data["run_config"]  # the stored overrides win
    assert "model=digits_wide" in redone["run_config"]
    chosen = [s["setting"] for s in redone["summary"] if s["selected_total"]]
    assert chosen == ["x100 q2 both ways: down topk 5% + q4 + ans, keyframes every 16 (q8 + ans)"]
    assert redone["summary"] == data["summary"]


def test_from_json_of_an_older_runs_json_takes_the_given_overrides(tmp_path: Path) -> None:
    stored = ROOT / "docs" / "results" / "partial_keyframes" / "digits_wide" / "runs.json"
    data = json.loads(stored.read_text())
    del data["run_config"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    comm.main(["--from-json", str(old), "--out", str(tmp_path / "out"), "-c",
               "model=digits_wide"])
    assert json.loads((tmp_path / "out" / "runs.json").read_text())["run_config"] == [
        "model=digits_wide"]
