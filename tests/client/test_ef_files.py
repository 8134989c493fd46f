"""A node's error-feedback residual survives a server that dies mid-round.

The node can finish round r (and persist its residual) while the server dies before it
records round r; the resumed server repeats round r, which must start from the residual
written after round r - 1 -- not from zero and not from round r's.
"""

from __future__ import annotations

import dataclasses

import torch
from flwr.app import Context, RecordDict

from fedslim.client.mod import _error_feedback, _persist
from fedslim.compression import ErrorFeedback
from fedslim.protocol import DownlinkHeader

HEAD = DownlinkHeader(stream=5, version=3, base=-1, arrays_key="arrays", uplink="topk:0.1",
                      error_feedback=True, keep=True, server_round=1, seed=42, lineage=77)


def _ef(value: float) -> ErrorFeedback:
    return ErrorFeedback.from_state({"w": torch.full((3,), value)})


def _loaded(path, server_round: int, lineage: int = 77) -> torch.Tensor | None:
    head = dataclasses.replace(HEAD, server_round=server_round, lineage=lineage, stream=9)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    state = _error_feedback(ctx, head, path).state_dict()
    return next(iter(state.values()), None)


def test_a_repeated_round_starts_from_the_residual_before_it(tmp_path):
    path = tmp_path / "ef-1.safetensors"
    for rnd in (1, 2, 3):  # the node finished rounds 1..3; residual r+0.5 after round r
        _persist(_ef(rnd + 0.5), path, dataclasses.replace(HEAD, server_round=rnd))
    assert torch.equal(_loaded(path, 4), torch.full((3,), 3.5))  # the normal next round
    assert torch.equal(_loaded(path, 3), torch.full((3,), 2.5))  # round 3 repeated
    assert _loaded(path, 2) is None  # older than what is kept: start from zero
    assert _loaded(path, 4, lineage=78) is None  # another run's files never apply


def test_rewriting_the_same_round_keeps_the_one_before(tmp_path):
    path = tmp_path / "ef-1.safetensors"
    _persist(_ef(1.5), path, dataclasses.replace(HEAD, server_round=1))
    _persist(_ef(2.5), path, dataclasses.replace(HEAD, server_round=2))
    _persist(_ef(2.75), path, dataclasses.replace(HEAD, server_round=2))  # round 2 again
    assert torch.equal(_loaded(path, 2), torch.full((3,), 1.5))
    assert torch.equal(_loaded(path, 3), torch.full((3,), 2.75))


def test_a_stale_residual_is_dropped_when_asked(tmp_path):
    path = tmp_path / "ef-1.safetensors"
    _persist(_ef(2.5), path, dataclasses.replace(HEAD, server_round=2))
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def loaded(server_round: int, reset_after: int) -> bool:
        head = dataclasses.replace(HEAD, server_round=server_round, stream=9,
                                   ef_reset_after=reset_after)
        return bool(_error_feedback(ctx, head, path).state_dict())

    assert loaded(12, 0)  # 0: never reset
    assert loaded(12, 10) and not loaded(13, 10)  # last trained in round 2
    assert DownlinkHeader.unpack(dataclasses.replace(HEAD, ef_reset_after=63).pack()) \
        .ef_reset_after == 63
