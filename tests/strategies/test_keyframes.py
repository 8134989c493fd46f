"""Downlink keyframes: a compressed whole model for nodes too far behind for a chain.

In process on :class:`tests.loopback.LoopbackGrid` (real Flower messages, real ClientApps
with the mod); the server's :class:`~fedslim.strategies.downlink.Downlink` on its own.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedslim.client import make_compression_mod
from fedslim.client.held import receive_global
from fedslim.compression import decode_update, parse_spec
from fedslim.config import parse_run_config
from fedslim.errors import ConfigError, DecodeError
from fedslim.flower_io import apply_delta, chain_record, state_crc, to_state
from fedslim.protocol import DELTA, DOWN, KEY_BASE, STATE_GLOBAL, STATE_META, DownlinkHeader
from fedslim.strategies import Compressed, FedslimFedAvg
from fedslim.strategies.downlink import Downlink
from tests.apps import initial_arrays, make_quickstart_app
from tests.loopback import LoopbackGrid


def _build(context):  # what fedslim's ClientApp does: the seeded round-0 model, rebuilt
    return to_state(initial_arrays())


def _target(state, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in state.items()}


def test_keyframe_is_the_next_version_and_nothing_is_lost():
    """The keyframe decodes (on the round-0 model) to exactly the server's new version,
    and what its codec rounded off is in the residual: version + residual == target."""
    down = Downlink(parse_spec("topk:0.1|q:4"), key_every=2, key_spec=parse_spec("q:4"))
    down.sync(initial_arrays())
    down.share_init()
    init = {k: v.clone() for k, v in down.state.items()}
    down.publish(_target(down.state, 1))            # version 2: a step
    assert down.key is None and len(down.steps) == 1
    target = _target(down.state, 2)
    residual_before = {k: v.clone() for k, v in down.ef.state_dict().items()}
    published = down.publish(target)                 # version 3: a keyframe
    assert down.key is not None and down.key_version == down.version == 3
    assert len(down.steps) == 0                      # no chain crosses a keyframe
    schema = {k: tuple(v.shape) for k, v in init.items()}
    rebuilt = apply_delta(init, decode_update(down.key, schema=schema).tensors)
    assert state_crc(rebuilt) == down.crc == state_crc(to_state(published))
    residual = down.ef.state_dict()
    for k in init:
        want = target[k] + residual_before.get(k, 0.0)
        assert torch.allclose(down.state[k] + residual[k], want, atol=1e-5)
    assert any(residual[k].abs().max() > 1e-4 for k in init)  # q:4 rounded something off


def test_plan_prefers_the_fewest_bytes():
    down = Downlink(parse_spec("topk:0.1|q:4"), key_every=3, key_spec=parse_spec("q:8|ans"))
    down.sync(initial_arrays())
    down.share_init()
    down.held[7] = down.version                      # node 7 holds version 1
    for seed in range(3):                            # versions 2, 3 (steps), 4 (keyframe)
        down.publish(_target(down.state, seed))
    assert down.key_version == 4
    kind, base, chain = down.plan(7)                 # behind the keyframe: no chain left
    assert (kind, base, len(chain)) == ("key", KEY_BASE, 1)
    assert len(chain[0]) < down.full_bytes / 2
    down.publish(_target(down.state, 9))             # version 5: a step after the keyframe
    kind, base, chain = down.plan(7)
    assert (kind, base, len(chain)) == ("key", KEY_BASE, 2)
    down.held[8] = 4
    assert down.plan(8)[:2] == ("delta", 4)          # one step is cheaper than the keyframe
    down.no_init.add(7)                              # cannot build the round-0 model
    assert down.plan(7)[0] == "full"


def test_nodes_coming_back_late_get_keyframes_and_stay_bit_identical():
    """20% participation, keyframes every 3 versions: nodes that missed a keyframe come
    back through it; every reply proves (CRC) its copy equals the server's."""
    n = 8
    grid = LoopbackGrid(make_quickstart_app([make_compression_mod(_build)]), n)
    strategy = Compressed(FedslimFedAvg(fraction_train=0.25, fraction_evaluate=0.0, seed=3),
                          uplink="topk:0.2|q:4", downlink="topk:0.1|q:4|ans",
                          shared_init=True, keyframe_every=3, keyframe="q:8|ans")
    arrays: ArrayRecord = initial_arrays()
    crc_of: dict[int, int] = {}
    for rnd in range(1, 13):
        msgs = strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), grid)
        crc_of[strategy.downlink.version] = strategy.downlink.crc
        new, _ = strategy.aggregate_train(rnd, grid.send_and_receive(msgs))
        assert new is not None and strategy.collector.current.rejects == []
        arrays = new
        for ctx in grid.contexts.values():
            meta = ctx.state.config_records.get(STATE_META)
            if meta is not None:
                held = to_state(ctx.state.array_records[STATE_GLOBAL])
                assert state_crc(held) == crc_of[int(meta["version"])]
    heads = [DownlinkHeader.from_record(m.content.config_records[DOWN]) for m in grid.sent
             if DOWN in m.content.config_records]
    assert sum(h.base == KEY_BASE for h in heads) >= 10
    full_bytes = sum(v.numel() * 4 for v in to_state(initial_arrays()).values())
    key_sizes = [size for m, size in zip(grid.sent, grid.bytes_down, strict=True)
                 if DOWN in m.content.config_records
                 and DownlinkHeader.from_record(m.content.config_records[DOWN]).base == KEY_BASE]
    assert key_sizes and max(key_sizes) < full_bytes


def test_key_messages_are_counted_in_the_round_reports():
    """With federated evaluation too: evaluate messages may be keyframe chains as well."""
    grid = LoopbackGrid(make_quickstart_app([make_compression_mod(_build)]), 6)
    strategy = Compressed(FedslimFedAvg(fraction_train=0.34, fraction_evaluate=0.34, seed=1),
                          uplink="topk:0.2|q:4", downlink="topk:0.1|q:4|ans",
                          shared_init=True, keyframe_every=2)
    strategy.start(grid, initial_arrays(), num_rounds=8, train_config=ConfigRecord({"lr": 0.1}),
                   evaluate_config=ConfigRecord())
    comm = [r.comm for r in strategy.collector.history if r.comm]
    assert len(comm) >= 7 and sum(c.key_messages for c in comm) >= 3
    assert all(r.rejects == [] for r in strategy.collector.history)


def _key_message(version: int, payloads: list[bytes] | None):
    head = DownlinkHeader(stream=1, version=version, base=KEY_BASE, arrays_key="arrays",
                          uplink="none", error_feedback=False, keep=True, server_round=1,
                          seed=0, init_crc=state_crc(to_state(initial_arrays())))
    content = RecordDict({DOWN: head.to_record()})
    if payloads is not None:
        content[DELTA] = chain_record(payloads)
    return Message(content=content, dst_node_id=1, message_type="train"), head


@pytest.mark.parametrize("version,payloads,fragment", [
    (5, None, "keyframe for version 5 without"),
    (5, [], r"catch-up of 0 steps to version 5 \(allowed: 1 to 5\)"),
    (2, [b"x"] * 3, r"catch-up of 3 steps to version 2 \(allowed: 1 to 2\)"),
    (300, [b"x"] * 257, r"catch-up of 257 steps to version 300 \(allowed: 1 to 256\)"),
])
def test_node_refuses_malformed_keyframe_chains(version, payloads, fragment):
    msg, head = _key_message(version, payloads)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(DecodeError, match=fragment):
        receive_global(msg, ctx, head, _build)


def test_node_refuses_a_chain_to_an_older_version():
    msg, head = _key_message(3, [])
    head = replace(head, base=5)  # (init_crc: the node builds its base itself)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(DecodeError, match=r"catch-up of -2 steps to version 3"):
        receive_global(msg, ctx, head, _build)


def test_only_a_failed_round0_build_stops_keyframes_for_a_node():
    down = Downlink(parse_spec("topk:0.1|q:4"), key_every=2, key_spec=parse_spec("q:8"))
    down.sync(initial_arrays())
    down.share_init()
    for seed in range(2):
        down.publish(_target(down.state, seed))
    content = RecordDict({"arrays": initial_arrays()})
    assert down.content_for(4, content, "arrays")[1] == "key"
    down.forget(4)                                   # e.g. the node's training failed
    assert down.content_for(4, content, "arrays")[1] == "key"
    down.forget(4, init_failed=True)                 # it cannot build the round-0 model
    assert down.content_for(4, content, "arrays")[1] == "full"


def test_no_keyframe_once_the_model_differs_from_round0_in_kind():
    down = Downlink(parse_spec("topk:0.1|q:4"), key_every=2, key_spec=parse_spec("q:8"))
    down.sync(initial_arrays())
    down.share_init()
    changed = {k: v.double() if k.endswith("bias") else v for k, v in down.state.items()}
    down.state = changed                             # e.g. an outside change of dtype
    down.publish(_target(down.state, 0))
    assert down.key is None and len(down.steps) == 1


def test_keyframes_need_a_compressing_downlink_and_shared_init():
    with pytest.raises(ConfigError, match="keyframe-every=4 needs a compressing downlink"):
        parse_run_config({"keyframe-every": 4, "uplink": "none"})  # so downlink auto is none
    with pytest.raises(ConfigError, match="shared-init=false"):
        parse_run_config({"keyframe-every": 4, "uplink": "topk:0.01|q:4",
                          "shared-init": False})
    with pytest.raises(ConfigError, match="keyframe-every"):
        parse_run_config({"keyframe-every": 33, "uplink": "topk:0.01|q:4"})
    cfg = parse_run_config({"keyframe-every": 8, "uplink": "topk:0.01|q:4",
                            "keyframe": "q:4|ans"})
    assert cfg.comp.keyframe_every == 8 and str(cfg.comp.keyframe) == "q:4|ans"
