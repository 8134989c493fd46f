"""The trust defence: the server's own reference update scores every client update."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fedslim.client import compression_mod
from fedslim.strategies import Compressed
from fedslim.strategies.guard import Guarded
from fedslim.strategies.trust import ServerReference, cosine, trust_factors
from tests.apps import Net, initial_arrays, load_data, make_quickstart_app
from tests.loopback import LoopbackGrid
from tests.strategies.test_guard import _accuracy

COLLUDERS = (0, 1)  # partition ids


def colluders(eps: float):  # type: ignore[no-untyped-def]
    """Inner-product manipulation from inside compression_mod: -eps x own update."""

    def mod(msg: Message, context, call_next):  # type: ignore[no-untyped-def]
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) not in COLLUDERS or \
                msg.metadata.message_type != "train":
            return reply
        start = msg.content["arrays"].to_torch_state_dict()
        local = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord(
            {k: start[k] - eps * (local[k] - start[k]) for k in local})
        return reply

    return mod


def _reference() -> ServerReference:
    x, y = load_data(50)  # the server's own labelled root set

    def train(model: nn.Module, server_round: int) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(0, len(x), 16):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()

    return ServerReference(Net(), train)


def _run(eps: float | None, trust: bool, stream: bool = True, rounds: int = 4
         ) -> tuple[dict, list]:
    mods = [compression_mod] + ([colluders(eps)] if eps is not None else [])
    grid = LoopbackGrid(make_quickstart_app(mods), 6)
    strategy = Compressed(Guarded(FedAvg(fraction_evaluate=0.0),
                                  reference=_reference() if trust else None),
                          uplink="topk:0.5|q:8", downlink="none", stream=stream)
    res = strategy.start(grid, initial_arrays(), num_rounds=rounds,
                         train_config=ConfigRecord({"lr": 0.1}))
    strategy.collector.close()
    return res.arrays.to_torch_state_dict(), strategy.collector.history


def test_cosine_matches_torch_and_is_zero_for_a_zero_update():
    gen = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(5, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    b = {"w": torch.randn(5, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    flat = torch.nn.functional.cosine_similarity(
        torch.cat([a["w"].flatten(), a["b"]]), torch.cat([b["w"].flatten(), b["b"]]), dim=0)
    assert cosine(a, b) == pytest.approx(float(flat), abs=1e-6)
    assert cosine({k: torch.zeros_like(v) for k, v in a.items()}, b) == 0.0


@given(st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=30),
       st.floats(0.01, 1.0))
def test_trust_factors_rule(cosines, ratio):
    factors = trust_factors(cosines, ratio)
    assert len(factors) == len(cosines)
    positive = sorted(c for c in cosines if c > 0)
    if max(cosines) <= 0:  # no agreement at all: the reference says nothing
        assert factors == [1.0] * len(cosines)
        return
    for c, f in zip(cosines, factors, strict=True):
        assert 0.0 <= f <= 1.0
        assert (f == 0.0) == (c <= 0)
    order = sorted(range(len(cosines)), key=cosines.__getitem__)
    assert all(factors[i] <= factors[j] for i, j in zip(order, order[1:], strict=False))
    if positive:  # the median positive update is never touched
        assert factors[cosines.index(positive[len(positive) // 2])] == 1.0


@pytest.mark.parametrize("stream", [True, False])
def test_trust_rejects_colluders_pointing_away_and_the_model_learns(stream):
    honest, _ = _run(None, trust=False, stream=stream)
    attacked_open, _ = _run(2.0, trust=False, stream=stream)
    attacked, history = _run(2.0, trust=True, stream=stream)
    for r in history:  # LoopbackGrid: node id = partition + 1
        left_out = {d.node - 1 for d in r.defences if d.action == "weight-zero"}
        assert set(COLLUDERS) <= left_out, (r.round, r.defences)
        assert r.rejects == [] and r.replies == 6  # left out is not a rejected reply
    assert _accuracy(attacked) >= _accuracy(honest) - 0.05
    assert _accuracy(attacked) > _accuracy(attacked_open) + 0.1


def test_trust_leaves_an_honest_round_almost_untouched():
    _, history = _run(None, trust=True)
    assert not [x for r in history for x in r.rejects]
    assert not [d for r in history for d in r.defences if d.action == "weight-zero"]
    weights = [d for r in history for d in r.defences if d.action == "down-weighted"]
    assert len(weights) <= len(history)  # at most a straggler a round loses some weight
    assert all(math.isfinite(float(d.detail.rsplit("x ", 1)[1])) for d in weights)


def test_multikrum_averages_all_but_the_assumed_malicious_replies():
    from fedslim.config import parse_run_config
    from fedslim.strategies.registry import build_strategy

    cfg = parse_run_config({}, {"strategy": "multikrum", "malicious-nodes": 1,
                                "fraction-evaluate": 0.0, "min-train-nodes": 2,
                                "min-available-nodes": 2})
    inner = build_strategy(cfg)
    grid = LoopbackGrid(make_quickstart_app([compression_mod]), 6)
    strategy = Compressed(inner, uplink="none", downlink="none")
    res = strategy.start(grid, initial_arrays(), num_rounds=3,
                         train_config=ConfigRecord({"lr": 0.1}))
    assert inner.num_nodes_to_select == 5  # type: ignore[attr-defined]
    assert _accuracy(res.arrays.to_torch_state_dict()) > 0.6


def test_trust_stands_aside_with_fewer_than_three_replies():
    grid = LoopbackGrid(make_quickstart_app([compression_mod, colluders(2.0)]), 2)
    strategy = Compressed(Guarded(FedAvg(fraction_evaluate=0.0, min_train_nodes=2,
                                         min_available_nodes=2), reference=_reference()),
                          uplink="none", downlink="none")
    strategy.start(grid, initial_arrays(), num_rounds=2, train_config=ConfigRecord({"lr": 0.1}))
    strategy.collector.close()
    for r in strategy.collector.history:
        assert [d.action for d in r.defences] == ["trust-skipped"] and r.aggregated
