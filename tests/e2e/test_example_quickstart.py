"""examples/quickstart-compressed, run as docs/use-in-your-app.md runs it (`flwr run`, the
simulation engine, 10 SuperNodes): a stock Flower app plus the two documented lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedslim.deploy.simulation import LocalSimulation
from tests.e2e.helpers import ROOT

pytestmark = pytest.mark.e2e
EXAMPLE = ROOT / "examples" / "quickstart-compressed"


def test_the_example_app_compresses_both_ways_and_rejects_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    with LocalSimulation(tmp_path / "sim") as sim:
        sim.run(EXAMPLE, {"compress": True, "num-server-rounds": 2, "results": str(out)},
                num_supernodes=10, done=out.exists)
    res = json.loads(out.read_text())
    assert res["rejects"] == 0  # train and evaluate replies all valid (an evaluate handler)
    assert [c["round"] for c in res["curve"]] == [1, 2]
    up = sum(c["uplink_bytes"] for c in res["comm"])
    none = sum(c["uplink_none_bytes"] for c in res["comm"])
    assert up * 20 < none  # 62k float32 values: ~248 kB per reply; auto sends a few kB
    # Round 1 sends the full model (a stock app cannot build the seeded initial model);
    # from round 2 on, nodes get compressed steps of the model they hold.
    second = res["comm"][1]
    assert (second["downlink_bytes"] + second["downlink_eval_bytes"]) * 20 \
        < 2 * second["uplink_none_bytes"]
