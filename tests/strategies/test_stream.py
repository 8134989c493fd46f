"""Streaming aggregation: one decoded update at a time, the same model bit for bit."""

from __future__ import annotations

import weakref

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedslim.client import compression_mod
from fedslim.config import ServerOpt
from fedslim.strategies import Compressed, FedslimFedAvg
from fedslim.strategies.guard import Guarded
from fedslim.strategies.stream import streams
from fedslim.strategies.uplink import UplinkDecoder
from tests.apps import initial_arrays, make_quickstart_app
from tests.loopback import LoopbackGrid


def scaled(factor: float, partition: int = 0):  # type: ignore[no-untyped-def]
    """A mod inside compression_mod: partition ``partition`` scales its update."""

    def mod(msg: Message, context, call_next):  # type: ignore[no-untyped-def]
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) != partition or \
                msg.metadata.message_type != "train":
            return reply
        start = msg.content["arrays"].to_torch_state_dict()
        local = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord(
            {k: start[k] + factor * (local[k] - start[k]) for k in local})
        reply.content["metrics"]["num-examples"] *= 3  # (capped by the defences)
        return reply

    return mod


def _run(stream: bool, uplink: str, factor: float, nodes: int = 6, rounds: int = 3):
    grid = LoopbackGrid(make_quickstart_app([compression_mod, scaled(factor)]), nodes)
    inner = FedslimFedAvg(fraction_evaluate=0.0, server_opt=ServerOpt.AVGM,
                          server_momentum=0.5, seed=3)
    strategy = Compressed(Guarded(inner), uplink=uplink, stream=stream, bind=True)
    assert streams(strategy.strategy)
    res = strategy.start(grid, initial_arrays(), num_rounds=rounds,
                         train_config=ConfigRecord({"lr": 0.1}))
    strategy.collector.close()
    return res.arrays.to_torch_state_dict(), strategy.collector.history


@pytest.mark.parametrize("uplink", ["topk:0.2|q:4", "none"])
@pytest.mark.parametrize("factor", [1.0, 5.0, 1e6])  # honest, clipped, rejected
def test_streaming_equals_materialized_bit_for_bit(uplink, factor):
    streamed, h1 = _run(True, uplink, factor)
    materialized, h2 = _run(False, uplink, factor)
    for k, v in materialized.items():
        assert torch.equal(streamed[k], v), k
    assert [(d.node, d.action) for r in h1 for d in r.defences] == \
        [(d.node, d.action) for r in h2 for d in r.defences]
    assert [(x.node, x.reason) for r in h1 for x in r.rejects] == \
        [(x.node, x.reason) for r in h2 for x in r.rejects]
    if factor == 5.0:
        assert any(d.action == "norm-clipped" for r in h1 for d in r.defences)
    if factor == 1e6:
        assert any("median" in x.reason for r in h1 for x in r.rejects)


def test_the_server_holds_one_decoded_update_at_a_time(monkeypatch):
    alive: list[weakref.ref] = []
    most = [0]
    real = UplinkDecoder.decode

    def counting(self, msg, base, exp, materialize=True):  # type: ignore[no-untyped-def]
        dec = real(self, msg, base, exp, materialize)
        most[0] = max(most[0], sum(r() is not None for r in alive) + 1)
        alive.append(weakref.ref(next(v for k, v in dec.weights.items()
                                      if v.data_ptr() != base[k].data_ptr())))
        return dec

    monkeypatch.setattr(UplinkDecoder, "decode", counting)
    _run(True, "topk:0.2|q:4", 1.0, nodes=8, rounds=2)
    assert len(alive) >= 2 * 8 * 2  # validated, then decoded again to fold: 8 replies x 2
    assert most[0] <= 2, most[0]  # the one being decoded, at most one not yet released
    # The counter sees accumulation: a layer that held every decoded update would show.
    held = []
    real_weights = UplinkDecoder.decode
    alive.clear()
    most[0] = 0

    def holding(self, msg, base, exp, materialize=True):  # type: ignore[no-untyped-def]
        dec = real_weights(self, msg, base, exp, materialize)
        held.append(dec.weights)
        return dec

    monkeypatch.setattr(UplinkDecoder, "decode", holding)
    _run(True, "topk:0.2|q:4", 1.0, nodes=8, rounds=1)
    assert most[0] >= 8
