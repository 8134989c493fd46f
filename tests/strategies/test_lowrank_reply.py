"""``uplink=lowrank:R``: PowerSGD factors through the real mod and wrapper; Q is warm-started."""

from __future__ import annotations

from fedslim.client.app import make_client_app
from fedslim.config import parse_run_config
from fedslim.protocol import STATE_LOWRANK
from fedslim.server.app import run_server
from tests.loopback import LoopbackGrid


def test_lowrank_uplink_learns_and_keeps_its_warm_start(tmp_path) -> None:
    overrides = {"num-server-rounds": 4, "output-dir": str(tmp_path), "progress": False,
                 "uplink": "lowrank:4|q:8", "downlink": "none"}
    grid = LoopbackGrid(make_client_app(overrides), 3)
    res = run_server(grid, parse_run_config(overrides))
    assert res.final is not None and res.final.error is None
    assert all(r.rejects == [] and r.replies == 3 for r in res.rounds)
    assert res.final.test_accuracy > 0.5
    comm = res.rounds[-1].comm
    assert comm is not None and comm.uplink_ratio is not None and comm.uplink_ratio > 10
    # conv kernels (64x288) and the two linear layers are factorised: 4 (m + n) values
    assert comm.kept_per_tensor["features.2.weight"] == 4 * (64 + 32 * 9)
    assert comm.kept_per_tensor["head.1.weight"] == 4 * (128 + 1024)
    for context in grid.contexts.values():
        warm = context.state.array_records[STATE_LOWRANK]
        assert set(warm) == {"features.0.weight", "features.2.weight", "head.1.weight",
                             "head.3.weight"}  # every weight matrix; biases go dense
        assert tuple(warm["head.1.weight"].shape) == (1024, 4)
