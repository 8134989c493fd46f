"""End-to-end: ``fedslim tune`` runs real federations and writes its front and choice."""

from __future__ import annotations

import json

import pytest

from tests.e2e.helpers import run_fedslim

pytestmark = pytest.mark.e2e


def test_tune_searches_on_val_and_reports_the_chosen_setting(tmp_path):
    out = tmp_path / "tune"
    proc = run_fedslim(["tune", "--trials", "1", "--rounds", "2", "--num-clients", "3",
                        "--score-seeds", "2", "--confirm-seeds", "1", "--min-ratio", "1",
                        "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert sum(line.startswith("trial") for line in lines) == 1
    assert not any("failed" in line for line in lines)
    assert any(line.startswith("chosen on val: uplink=budget:x") and "fresh seeds 1042" in line
               for line in lines)
    data = json.loads((out / "tune.json").read_text())
    assert len(data["trials"]) == 1 and data["n_trials"] == 1
    assert data["score_seeds"] == [42, 43] and len(data["trials"][0]["val_per_seed"]) == 2
    chosen = data["chosen"]
    assert chosen["pareto"] and chosen["uplink_ratio"] > 1
    confirmation = data["confirmation"]
    assert confirmation["seeds"] == [1042] and len(confirmation["none_test_per_seed"]) == 1
    assert (out / "pareto.png").stat().st_size > 10_000 and (out / "trials.csv").is_file()
