"""``uplink=budget:``: every train reply, as Flower serializes it, stays within the budget."""

from __future__ import annotations

import pytest

from fedslim.client.app import make_client_app
from fedslim.config import parse_run_config
from fedslim.server.app import run_server
from tests.loopback import LoopbackGrid

pytest.importorskip("constriction")


@pytest.mark.parametrize("budget", ["budget:2500|q:4|ans", "budget:x250|q:4|ans|pass:0"])
def test_whole_replies_fit_the_budget_and_the_model_learns(tmp_path, budget: str) -> None:
    overrides = {"num-server-rounds": 4, "output-dir": str(tmp_path), "progress": False,
                 "uplink": budget, "server-opt": "avgm", "server-momentum": 0.5}
    cfg = parse_run_config(overrides)
    grid = LoopbackGrid(make_client_app(overrides), 4)
    res = run_server(grid, cfg)
    limit = 2500 if "2500" in budget else 605_224 // 250
    train_up = [n for m, n in zip(grid.received, grid.bytes_up, strict=True)
                if m.metadata.message_type == "train"]
    assert len(train_up) == 16 and max(train_up) <= limit
    assert min(train_up) > 0.9 * limit  # and the budget is used
    assert all(r.rejects == [] for r in res.rounds)
    assert res.final is not None and res.final.test_accuracy > 0.5
    comm = res.rounds[-1].comm  # the allocation is reported per tensor, mean over replies
    assert comm is not None and comm.kept_replies == 4
    kept = comm.kept_per_tensor
    assert set(kept) == {"features.0.weight", "features.0.bias", "features.2.weight",
                         "features.2.bias", "head.1.weight", "head.1.bias", "head.3.weight",
                         "head.3.bias"}
    assert kept["head.1.weight"] > kept["head.3.weight"] > 0


def test_a_budget_smaller_than_the_envelope_is_a_client_error(tmp_path) -> None:
    overrides = {"num-server-rounds": 1, "output-dir": str(tmp_path), "progress": False,
                 "uplink": "budget:900|q:4"}
    res = run_server(LoopbackGrid(make_client_app(overrides), 3), parse_run_config(overrides))
    assert res.final is not None and res.final.error is not None
    reasons = [r.reason for r in res.rounds[0].rejects]
    assert reasons and all("raise the budget" in r for r in reasons)


def test_a_stock_quickstart_app_with_the_mod_fits_the_budget_too(tmp_path) -> None:
    """The mod counts whatever the app puts in its reply (its own metrics names, here)."""
    from fedslim.client import compression_mod
    from tests.apps import make_quickstart_app

    cfg = parse_run_config({"plugins": "tests.plugins.blobs", "model": "blobs_net",
                            "dataset": "blobs", "progress": False, "num-server-rounds": 2,
                            "min-train-nodes": 2, "output-dir": str(tmp_path),
                            "client.lr": "0.1", "shared-init": False,
                            "uplink": "budget:1500|q:4|ans|pass:0"})
    grid = LoopbackGrid(make_quickstart_app([compression_mod]), 3)
    res = run_server(grid, cfg)
    train_up = [n for m, n in zip(grid.received, grid.bytes_up, strict=True)
                if m.metadata.message_type == "train"]
    assert len(train_up) == 6 and max(train_up) <= 1500
    assert res.final is not None and res.final.error is None
