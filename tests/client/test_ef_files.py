"""A node's error-feedback residual survives a server that dies mid-round.

The node can finish round r (and persist its residual) while the server dies before it
records round r; the resumed server repeats round r, which must start from the residual
written after round r - 1 -- not from zero and not from round r's.
"""

from __future__ import annotations

import dataclasses

import torch
from flwr.app import Context, RecordDict

from fedslim.client.residual import load_residual as _error_feedback
from fedslim.client.residual import persist_residual as _persist
from fedslim.compression import ErrorFeedback
from fedslim.protocol import DownlinkHeader
from fedslim.server.storage import overwrite_model

HEAD = DownlinkHeader(stream=5, version=3, base=-1, arrays_key="arrays", uplink="topk:0.1",
                      error_feedback=True, keep=True, server_round=1, seed=42, lineage=77)


def _ef(value: float) -> ErrorFeedback:
    return ErrorFeedback.from_state({"w": torch.full((3,), value)})


def _slots(tmp_path):  # type: ignore[no-untyped-def]
    return tmp_path / "ef-1.0.safetensors", tmp_path / "ef-1.1.safetensors"


def _ctx() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _loaded(slots, server_round: int, lineage: int = 77) -> torch.Tensor | None:
    head = dataclasses.replace(HEAD, server_round=server_round, lineage=lineage, stream=9)
    state = _error_feedback(_ctx(), head, slots)[0].state_dict()
    return next(iter(state.values()), None)


def _train(slots, server_round: int, value: float) -> None:  # type: ignore[no-untyped-def]
    """What a node does in a round: read its residual, then write the new one."""
    head = dataclasses.replace(HEAD, server_round=server_round, stream=9)
    _, loaded = _error_feedback(_ctx(), head, slots)
    _persist(_ef(value), slots, loaded, head)


def test_a_repeated_round_starts_from_the_residual_before_it(tmp_path):
    path = _slots(tmp_path)
    for rnd in (1, 2, 3):  # the node finished rounds 1..3; residual r+0.5 after round r
        _train(path, rnd, rnd + 0.5)
    assert torch.equal(_loaded(path, 4), torch.full((3,), 3.5))  # the normal next round
    assert torch.equal(_loaded(path, 3), torch.full((3,), 2.5))  # round 3 repeated
    assert _loaded(path, 2) is None  # older than what is kept: start from zero
    assert _loaded(path, 4, lineage=78) is None  # another run's files never apply


def test_rewriting_the_same_round_keeps_the_one_before(tmp_path):
    path = _slots(tmp_path)
    _train(path, 1, 1.5)
    _train(path, 2, 2.5)
    _train(path, 2, 2.75)  # round 2 again (the server resumed)
    assert torch.equal(_loaded(path, 2), torch.full((3,), 1.5))
    assert torch.equal(_loaded(path, 3), torch.full((3,), 2.75))


def test_a_residual_torn_mid_write_is_never_read(tmp_path):
    """The round goes into the header last: a write killed before that leaves the
    placeholder, which no round reads (the other slot still holds the residual before)."""
    path = _slots(tmp_path)
    _train(path, 1, 1.5)
    _train(path, 2, 2.5)
    # round 3 killed mid-write: placeholder header, data of the new residual
    torn = next(p for p in path if torch.equal(_loaded_file(p), torch.full((3,), 1.5)))
    overwrite_model(torn, {"w": torch.full((3,), 9.0)},
                    {"lineage": "77", "round": f"{-1:>20}"})
    assert torch.equal(_loaded(path, 3), torch.full((3,), 2.5))
    assert torch.equal(_loaded(path, 4), torch.full((3,), 2.5))


def _loaded_file(path) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    return load_file(str(path))["w"]


def test_a_stale_residual_is_dropped_when_asked(tmp_path):
    path = _slots(tmp_path)
    _train(path, 2, 2.5)
    ctx = _ctx()

    def loaded(server_round: int, reset_after: int) -> bool:
        head = dataclasses.replace(HEAD, server_round=server_round, stream=9,
                                   ef_reset_after=reset_after)
        return bool(_error_feedback(ctx, head, path)[0].state_dict())

    assert loaded(12, 0)  # 0: never reset
    assert loaded(12, 10) and not loaded(13, 10)  # last trained in round 2
    assert DownlinkHeader.unpack(dataclasses.replace(HEAD, ef_reset_after=63).pack()) \
        .ef_reset_after == 63
