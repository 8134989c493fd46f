"""``Compressed`` around stock Flower strategies, with a stock quickstart ClientApp + the mod.

Runs in process on :class:`tests.loopback.LoopbackGrid` (real Flower messages through real
serialization, real ClientApps and mods, per-node state kept across rounds); the e2e tests
run the same stacks in Flower's simulation engine.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg

from fedslim.client import compression_mod
from fedslim.config import ServerOpt
from fedslim.flower_io import (
    payload_from_record,
    payload_record,
    state_crc,
    to_state,
    unfold_reply,
)
from fedslim.protocol import (
    DOWN,
    PAYLOAD,
    STATE_GLOBAL,
    STATE_META,
    UP,
    DownlinkHeader,
    UplinkHeader,
)
from fedslim.strategies import Compressed, FedslimFedAvg
from tests.apps import NODES, STACKS, initial_arrays, make_quickstart_app
from tests.loopback import LoopbackGrid


def train_config() -> ConfigRecord:
    return ConfigRecord({"lr": 0.1})  # fresh each time: strategies write into it


def _run(strategy, grid, rounds=2):
    return strategy.start(grid, initial_arrays(), num_rounds=rounds,
                          train_config=train_config(), evaluate_config=ConfigRecord())


def _states_equal(a: ArrayRecord, b: ArrayRecord) -> bool:
    sa, sb = a.to_torch_state_dict(), b.to_torch_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_plain_wrapper_is_stock_flower_bit_for_bit():
    """uplink=none, downlink=none: same messages, same model as the bare strategy."""
    random.seed(3)
    bare = _run(FedAvg(), LoopbackGrid(make_quickstart_app(), 4), rounds=3)
    random.seed(3)
    grid = LoopbackGrid(make_quickstart_app([compression_mod]), 4)
    wrapped = Compressed(FedAvg(), uplink="none", downlink="none")
    res = _run(wrapped, grid, rounds=3)
    assert _states_equal(bare.arrays, res.arrays)
    assert all(UP not in m.content for m in grid.received)
    report = wrapped.collector.current
    assert report is not None and report.comm is not None
    assert report.comm.uplink_ratio == 1.0
    assert report.comm.total_ratio == 1.0  # both directions as stock Flower sent them


STRATEGIES = {**STACKS, "fedslim-avgm": lambda: FedslimFedAvg(server_opt=ServerOpt.AVGM,
                                                                server_momentum=0.5)}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_compressed_under_any_strategy(name):
    grid = LoopbackGrid(make_quickstart_app([compression_mod]), NODES)
    strategy = Compressed(STRATEGIES[name](), uplink="topk:0.1|q:4",
                          downlink="topk:0.25|q:8")
    start = initial_arrays()
    res = _run(strategy, grid, rounds=3)
    reports = [*strategy.collector.history, strategy.collector.current]
    assert [r.round for r in reports] == [1, 2, 3]
    for r in reports:
        assert r.rejects == [] and r.replies == 4, (name, r.rejects)
        assert r.comm is not None and r.comm.uplink_ratio is not None
        assert r.comm.uplink_ratio > 4  # 10% of a 2.7k-parameter MLP at 4 bits + headers
    assert not _states_equal(start, res.arrays)
    assert all(torch.isfinite(v).all() for v in res.arrays.to_torch_state_dict().values())
    # The ledger counts what crossed the wire, both directions, message by message.
    ledger_down = sum(r.comm.downlink_bytes + r.comm.downlink_eval_bytes for r in reports)
    ledger_up = sum(r.comm.uplink_bytes + r.comm.uplink_eval_bytes for r in reports)
    assert ledger_up == sum(grid.bytes_up)
    # Pushed messages gain a message id, run id and timestamp (<= 64 bytes) after counting.
    assert 0 <= sum(grid.bytes_down) - ledger_down <= 64 * len(grid.bytes_down)
    # Round 1's train messages carry the full model: plain, each is the message less
    # fedslim's header (a few hundred bytes); later messages carry steps, far smaller.
    first, last = reports[0].comm, reports[-1].comm
    assert first.downlink_none_bytes > first.downlink_bytes - 600 * NODES
    assert last.downlink_none_bytes > 2 * (last.downlink_bytes + last.downlink_eval_bytes)
    assert 1 < last.total_ratio < last.total_none_bytes / max(last.uplink_bytes, 1)


def test_client_and_server_copies_stay_bit_identical_with_missed_rounds():
    """Nodes that skip rounds get the full model; every held copy equals the server's."""
    grid = LoopbackGrid(make_quickstart_app([compression_mod]), 5)
    strategy = Compressed(FedslimFedAvg(fraction_train=0.4, fraction_evaluate=0.0, seed=1),
                          uplink="topk:0.2|q:4", downlink="topk:0.1|q:4")
    crc_of: dict[int, int] = {}
    arrays = initial_arrays()
    for rnd in range(1, 7):
        msgs = strategy.configure_train(rnd, arrays, train_config(), grid)
        crc_of[strategy.downlink.version] = strategy.downlink.crc
        new, _ = strategy.aggregate_train(rnd, grid.send_and_receive(msgs))
        assert new is not None and strategy.collector.current.rejects == []
        arrays = new
        held = 0
        for ctx in grid.contexts.values():
            meta = ctx.state.config_records.get(STATE_META)
            if meta is not None:
                state = to_state(ctx.state.array_records[STATE_GLOBAL])
                assert state_crc(state) == crc_of[int(meta["version"])]
                held += 1
        assert held >= 2
    heads = [DownlinkHeader.from_record(m.content.config_records[DOWN]) for m in grid.sent
             if DOWN in m.content.config_records]  # (not the partition-id queries)
    steps = [h.version - h.base for h in heads if h.base >= 0]
    assert any(s >= 2 for s in steps), steps  # catch-up chains for nodes that missed rounds
    assert any(h.base == -1 for h in heads[2:])  # first contact: the full model


def test_stock_client_without_the_mod_is_told_what_is_missing():
    grid = LoopbackGrid(make_quickstart_app(), 3)
    strategy = Compressed(FedAvg(), uplink="topk:0.1|q:4")
    _run(strategy, grid, rounds=1)
    rejects = strategy.collector.current.rejects
    assert len(rejects) == 3
    assert all("compression_mod" in r.reason or "arrays" in r.reason for r in rejects), rejects


def _hostile(kind):
    """A mod OUTSIDE compression_mod that tampers with node 1's encoded reply."""
    stash: dict[str, Message] = {}

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) != 0 or msg.metadata.message_type != "train":
            return reply
        if kind == "replay":
            if "first" not in stash:
                stash["first"] = reply
                return reply
            old = stash["first"]
            return Message(content=old.content, reply_to=msg)
        unfold_reply(reply.content, "test")  # the compact form back to the usual records
        data = payload_from_record(reply.content.array_records[PAYLOAD], "test")
        header, used = UplinkHeader.unpack(data, "test")
        if kind == "crc":
            header = replace(header, global_crc=(header.global_crc + 1) % (1 << 32))
            data = header.pack() + data[used:]
        elif kind == "no-header":
            data = data[used:]  # the bare wire payload
        elif kind == "weight-inf":
            reply.content["metrics"]["num-examples"] = float("inf")
        elif kind == "weight-list":
            reply.content["metrics"]["num-examples"] = [1, 2]
        elif kind == "header-type":
            data = b"FSXX" + data[4:]
        reply.content[PAYLOAD] = payload_record(data)
        return reply

    return mod


@pytest.mark.parametrize("kind,fragment", [
    ("replay", "stale or replayed"),
    ("crc", "differs from the server"),
    ("no-header", "not a fedslim v2 uplink header"),
    ("weight-inf", "num-examples"),
    ("weight-list", "num-examples"),
    ("header-type", "not a fedslim v2 uplink header"),
])
def test_hostile_reply_is_rejected_and_the_round_goes_on(kind, fragment):
    grid = LoopbackGrid(make_quickstart_app([_hostile(kind), compression_mod]), 4)
    strategy = Compressed(FedAvg(fraction_evaluate=0.0), uplink="topk:0.1|q:4",
                          downlink="topk:0.2|q:8")
    res = _run(strategy, grid, rounds=2)
    last = strategy.collector.current
    assert last is not None and last.replies == 3 and len(last.rejects) == 1
    assert fragment in last.rejects[0].reason, last.rejects[0].reason
    assert last.rejects[0].partition in (0, None)
    assert all(torch.isfinite(v).all() for v in res.arrays.to_torch_state_dict().values())


def test_payload_with_another_pipeline_than_asked_is_rejected():
    def other_spec(msg, context, call_next):
        if int(context.node_config["partition-id"]) == 2:
            head = DownlinkHeader.from_record(msg.content.config_records[DOWN])
            msg.content[DOWN] = replace(head, uplink="topk:0.5|q:8").to_record()
        return call_next(msg, context)

    grid = LoopbackGrid(make_quickstart_app([other_spec, compression_mod]), 3)
    strategy = Compressed(FedAvg(fraction_evaluate=0.0), uplink="topk:0.1|q:4")
    _run(strategy, grid, rounds=1)
    rejects = strategy.collector.current.rejects
    # (the uplink leaves its spec out: the records themselves contradict the one asked for)
    assert len(rejects) == 1 and "spec 'topk:0.1|q:4'" in rejects[0].reason


def test_stack_state_round_trips_through_the_wrapper():
    strategy = Compressed(FedslimFedAvg(server_opt=ServerOpt.AVGM, server_momentum=0.5),
                          uplink="topk:0.1|q:4", downlink="topk:0.2|q:8")
    grid = LoopbackGrid(make_quickstart_app([compression_mod]), 3)
    _run(strategy, grid, rounds=2)
    state = strategy.state_dict()
    assert any(k.startswith("downlink/residual/") for k in state)
    assert any(k.startswith("inner/opt/m/") for k in state)
    fresh = Compressed(FedslimFedAvg(server_opt=ServerOpt.AVGM, server_momentum=0.5),
                       uplink="topk:0.1|q:4", downlink="topk:0.2|q:8")
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_plain_mode_still_validates_names_shapes_and_values():
    def nan_weights(msg, context, call_next):
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) == 1 and msg.metadata.message_type == "train":
            state = reply.content["arrays"].to_torch_state_dict()
            state["fc1.weight"][0, 0] = float("nan")
            reply.content["arrays"] = ArrayRecord(state)
        return reply

    grid = LoopbackGrid(make_quickstart_app([nan_weights, compression_mod]), 3)
    strategy = Compressed(FedAvg(fraction_evaluate=0.0), uplink="none")
    res = _run(strategy, grid, rounds=1)
    rejects = strategy.collector.current.rejects
    assert len(rejects) == 1 and "NaN" in rejects[0].reason
    assert all(torch.isfinite(v).all() for v in res.arrays.to_torch_state_dict().values())


def test_a_run_whose_nodes_never_come_ends_with_an_error_not_a_hang():
    import time

    from fedslim.strategies.wrapper import NodeGuard, NodesUnavailable

    grid = LoopbackGrid(make_quickstart_app([compression_mod]), 2)
    strategy = NodeGuard(Compressed(FedAvg(min_available_nodes=3)), min_nodes=3, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(NodesUnavailable, match="2 node.*3 needed.*node-timeout"):
        _run(strategy, grid, rounds=1)
    assert time.monotonic() - t0 < 5


def test_shared_init_sends_no_model_and_falls_back_for_nodes_that_cannot_build_it():
    from fedslim.client import make_compression_mod
    from fedslim.flower_io import to_state

    init = initial_arrays()

    def build(context):  # what fedslim's ClientApp does: the seeded model, rebuilt here
        return to_state(initial_arrays())

    apps = {0: make_quickstart_app([make_compression_mod(build)]),
            1: make_quickstart_app([make_compression_mod(build)]),
            2: make_quickstart_app([compression_mod])}  # cannot build it
    grid = LoopbackGrid(lambda i: apps[i], 3)
    strategy = Compressed(FedAvg(fraction_evaluate=0.0), uplink="topk:0.2|q:4",
                          downlink="topk:0.2|q:8", shared_init=True)
    strategy.start(grid, init, num_rounds=3, train_config=train_config())
    first, second = strategy.collector.history[:2]
    assert first.comm.init_messages == 3 and first.comm.full_model_messages == 0
    assert [r.node for r in first.rejects] == [3]  # the node without initial_state
    assert second.comm.full_model_messages == 1 and second.rejects == []
    assert first.comm.downlink_bytes < 3 * 2_000  # headers only: no weights went down


class _SilentGrid(LoopbackGrid):
    """Node 1 never answers train messages (a crashed or partitioned node)."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        return [r for r in replies
                if not (r.metadata.src_node_id == 1 and r.metadata.message_type == "train")]


def test_a_node_that_never_answers_counts_as_a_failure():
    grid = _SilentGrid(make_quickstart_app([compression_mod]), 4)
    strategy = Compressed(FedAvg(), uplink="topk:0.1|q:4", downlink="none")
    _run(strategy, grid, rounds=2)
    for r in [*strategy.collector.history, strategy.collector.current]:
        assert r.replies == 3 and r.silent == 1 and r.failures == 1
        assert r.aggregated
