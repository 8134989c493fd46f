"""spill: a node's model-sized state lives in files, not in Flower's node context."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord

from fedslim.client.mod import make_compression_mod
from fedslim.config import ServerOpt
from fedslim.protocol import STATE_EF, STATE_GLOBAL
from fedslim.strategies import Compressed, FedslimFedAvg
from tests.apps import initial_arrays, make_quickstart_app
from tests.loopback import LoopbackGrid


def _run(tmp_path, spill: bool):  # type: ignore[no-untyped-def]
    mod = make_compression_mod(state_dir=lambda ctx: tmp_path / "state", spill=spill)
    grid = LoopbackGrid(make_quickstart_app([mod]), 4)
    strategy = Compressed(FedslimFedAvg(fraction_train=0.5, fraction_evaluate=0.0, seed=2,
                                        server_opt=ServerOpt.AVGM, server_momentum=0.5),
                          uplink="topk:0.1|q:4", downlink="topk:0.2|q:4")
    res = strategy.start(grid, initial_arrays(), num_rounds=4,
                         train_config=ConfigRecord({"lr": 0.1}))
    return res.arrays.to_torch_state_dict(), grid.contexts


def test_spilled_state_gives_the_same_model_and_keeps_the_context_small(tmp_path):
    spilled, contexts = _run(tmp_path / "a", spill=True)
    kept, mem_contexts = _run(tmp_path / "b", spill=False)
    for k, v in kept.items():
        assert torch.equal(spilled[k], v), k
    for ctx in contexts.values():  # only small records: no model-sized arrays
        assert STATE_GLOBAL not in ctx.state and STATE_EF not in ctx.state
    assert any(STATE_GLOBAL in c.state for c in mem_contexts.values())
    files = {p.name.split("-")[0] for p in (tmp_path / "a" / "state").iterdir()}
    assert files == {"global", "ef"}, files


def test_a_node_that_already_holds_the_version_does_not_rewrite_its_copy(tmp_path,
                                                                          monkeypatch):
    """With evaluation on, each evaluate message brings the new global and the next train
    message says "you hold it": that message must not write the 4-tensor copy again."""
    import fedslim.client.held as mod_module

    writes: list[str] = []
    real = mod_module.overwrite_model

    def counting(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        writes.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(mod_module, "overwrite_model", counting)
    mod = make_compression_mod(state_dir=lambda ctx: tmp_path / "state", spill=True)
    grid = LoopbackGrid(make_quickstart_app([mod]), 2)
    strategy = Compressed(FedslimFedAvg(fraction_train=1.0, fraction_evaluate=1.0, seed=2),
                          uplink="topk:0.1|q:4", downlink="topk:0.2|q:4")
    strategy.start(grid, initial_arrays(), num_rounds=3, train_config=ConfigRecord({"lr": 0.1}))
    held = [w for w in writes if w.startswith("global")]
    # Per node: round 1 train (first copy) + one per evaluate message (a new version each
    # round); the train messages of rounds 2 and 3 find the version held: no write.
    assert len(held) == 2 * (1 + 3), writes
    for node in ("0", "1"):  # each write goes to the slot the node does not hold now
        slots = [w.split(".")[1] for w in held if w.startswith(f"global-{node}.")]
        assert slots == ["0", "1", "0", "1"], slots
