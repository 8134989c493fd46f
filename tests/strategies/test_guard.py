"""Server-side defences against valid-looking hostile updates (Guarded)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg

from fedslim.client import compression_mod
from fedslim.strategies import Compressed
from fedslim.strategies.guard import Guarded, norm_bound, update_norm
from tests.apps import initial_arrays, load_data, make_quickstart_app
from tests.loopback import LoopbackGrid

ATTACKER = 0  # partition id


def attack(kind: str):  # type: ignore[no-untyped-def]
    """A mod INSIDE compression_mod: it sees plain weights, the mod encodes its lie."""

    def mod(msg: Message, context, call_next):  # type: ignore[no-untyped-def]
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) != ATTACKER or \
                msg.metadata.message_type != "train":
            return reply
        start = msg.content["arrays"].to_torch_state_dict()
        local = reply.content["arrays"].to_torch_state_dict()
        if kind == "scaled":
            out = {k: start[k] + 1e6 * (local[k] - start[k]) for k in local}
        elif kind == "sign-flip-heavy":
            out = {k: start[k] - (local[k] - start[k]) for k in local}
            reply.content["metrics"]["num-examples"] = 10**9
        elif kind == "inflated":  # an honest update claiming 5x its examples
            out = local
            reply.content["metrics"]["num-examples"] = 5 * len(load_data(0)[0])
        else:  # "huge": a constant 3e38 (finite, but its average overflows)
            out = {k: torch.full_like(v, 3e38) for k, v in local.items()}
        reply.content["arrays"] = ArrayRecord(out)
        return reply

    return mod


def _final(kind: str | None, guarded: bool, rounds: int = 4) -> tuple[dict, list]:
    mods = [compression_mod] + ([attack(kind)] if kind else [])
    grid = LoopbackGrid(make_quickstart_app(mods), 6)
    inner = FedAvg(fraction_evaluate=0.0)
    strategy = Compressed(Guarded(inner) if guarded else
                          Guarded(inner, clip_ratio=0.0, weight_ratio=0.0, reject_ratio=0.0),
                          uplink="topk:0.5|q:8", downlink="none")
    res = strategy.start(grid, initial_arrays(), num_rounds=rounds,
                         train_config=ConfigRecord({"lr": 0.1}))
    strategy.collector.close()
    return res.arrays.to_torch_state_dict(), strategy.collector.history


def _accuracy(state: dict) -> float:
    from tests.apps import Net, load_data

    net = Net()
    net.load_state_dict(state)
    x, y = load_data(99)
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("kind,action", [("scaled", "rejected"),
                                         ("sign-flip-heavy", "rejected"),
                                         ("inflated", "weight-capped")])
def test_defences_keep_a_hostile_client_from_steering_the_model(kind, action):
    honest, _ = _final(None, guarded=True)
    attacked, history = _final(kind, guarded=True)
    assert all(torch.isfinite(v).all() for v in attacked.values())
    acts = {(d.node, d.action) for r in history for d in r.defences} | {
        (x.node, "rejected") for r in history for x in r.rejects if "median" in x.reason}
    assert (ATTACKER + 1, action) in acts, acts  # LoopbackGrid: node id = partition + 1
    assert _accuracy(attacked) >= _accuracy(honest) - 0.15


def test_without_defences_a_scaled_update_wrecks_the_model():
    attacked, history = _final("scaled", guarded=False)
    assert _accuracy(attacked) < 0.5 or not all(
        torch.isfinite(v).all() for v in attacked.values())
    assert not any(r.defences for r in history)


def test_a_constant_3e38_can_never_make_the_model_nan():
    for guarded in (True, False):
        state, history = _final("huge", guarded=guarded, rounds=3)
        assert all(torch.isfinite(v).all() for v in state.values()), guarded
        actions = {d.action for r in history for d in r.defences} | {
            "rejected" for r in history if r.rejects}
        assert actions, "the attack went unnoticed"


def test_norm_bound_rule():
    assert norm_bound([1.0, 2.0, 100.0], 3.0, 0.0) == 6.0
    assert norm_bound([1.0, 2.0], 3.0, 0.0) == math.inf  # too few replies for a median
    assert norm_bound([1.0, 2.0], 3.0, 5.0) == 5.0
    a = {"w": torch.tensor([3.0, 4.0])}
    b = {"w": torch.zeros(2)}
    assert update_norm(a, b, ["w"]) == 5.0
