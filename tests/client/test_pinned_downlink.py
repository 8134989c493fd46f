"""A node decodes the downlink only with the pipelines it was told (deltas, keyframes)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from fedslim.client import make_compression_mod
from fedslim.client.held import Pinned
from fedslim.compression import parse_spec
from fedslim.flower_io import to_state
from fedslim.strategies import Compressed, FedslimFedAvg
from tests.apps import initial_arrays, make_quickstart_app
from tests.loopback import LoopbackGrid

DOWN, KEY = "topk:0.1|q:4|ans", "q:8|ans"


def _build(context):  # type: ignore[no-untyped-def]
    return to_state(initial_arrays())


def _run(pinned: Pinned) -> list:
    mod = make_compression_mod(_build, downlink=lambda ctx: pinned)
    grid = LoopbackGrid(make_quickstart_app([mod]), 4)
    strategy = Compressed(FedslimFedAvg(fraction_train=0.5, fraction_evaluate=0.0, seed=2),
                          uplink="topk:0.2|q:4", downlink=DOWN, shared_init=True,
                          keyframe_every=2, keyframe=KEY)
    strategy.start(grid, initial_arrays(), num_rounds=6,
                   train_config=ConfigRecord({"lr": 0.1}))
    strategy.collector.close()
    return strategy.collector.history


def test_the_pipelines_the_node_was_told_decode():
    history = _run(Pinned(delta=parse_spec(DOWN), keyframe=parse_spec(KEY)))
    assert all(r.failures == 0 and r.rejects == [] for r in history)
    assert sum(r.comm.key_messages for r in history if r.comm) >= 1


@pytest.mark.parametrize("pinned", [Pinned(delta=parse_spec("topk:0.2|q:4|ans"),
                                           keyframe=parse_spec(KEY)),
                                    Pinned(delta=parse_spec(DOWN),
                                           keyframe=parse_spec("q:4|ans"))])
def test_another_pipeline_is_refused_by_the_node(pinned):
    history = _run(pinned)
    reasons = [x.reason for r in history for x in r.rejects]
    assert reasons and all("payload uses pipeline" in x and "expected" in x for x in reasons)
    assert sum(r.failures for r in history) == len(reasons)
