"""End-to-end: ``Compressed`` around stock Flower strategies in a real simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.helpers import ROOT
from tests.e2e.stacks_federation import STACKS

pytestmark = pytest.mark.e2e


def test_compression_layer_under_stock_strategies_and_a_dp_wrapper(tmp_path):
    out, sizes = tmp_path / "stacks.json", tmp_path / "sizes.jsonl"
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.stacks_federation", str(out),
                           str(sizes)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert sorted(res) == sorted(STACKS)
    ledger_down = ledger_up = 0
    for name, run in res.items():
        rounds = run["rounds"]
        assert [r["round"] for r in rounds] == [1, 2], name
        for r in rounds:
            assert r["replies"] == 4 and r["rejects"] == [], (name, r["rejects"])
            assert r["comm"]["uplink_ratio"] > 4, name
            ledger_down += r["comm"]["downlink_bytes"] + r["comm"]["downlink_eval_bytes"]
            ledger_up += r["comm"]["uplink_bytes"] + r["comm"]["uplink_eval_bytes"]
        assert rounds[1]["comm"]["current_messages"] == 4, name  # train needs no arrays
        assert run["final_arrays"] == 4, name
    # What the clients saw, both directions, against the server's ledger: replies are
    # identical; instructions gain a message id and timestamp after the server counts them.
    seen = [json.loads(line) for line in sizes.read_text().splitlines()]
    assert len(seen) == len(STACKS) * 2 * 2 * 4
    assert sum(s["up"] for s in seen) == ledger_up
    assert 0 <= sum(s["down"] for s in seen) - ledger_down <= 64 * len(seen)
