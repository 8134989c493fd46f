import json
import os

import pytest
import torch

from fedslim.errors import CheckpointError
from fedslim.server.storage import (
    CHECKPOINT_FILE,
    Checkpoint,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [f.name for f in tmp_path.iterdir()] == ["f.json"], "temp files left behind"


def test_crash_during_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    p = tmp_path / "ckpt"
    atomic_write_bytes(p, b"old-complete")

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(p, b"new-but-interrupted")
    assert p.read_bytes() == b"old-complete"
    assert [f.name for f in tmp_path.iterdir()] == ["ckpt"]


def test_model_round_trip(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.arange(3, dtype=torch.float32)}
    n = save_model(tmp_path / "m.safetensors", state)
    assert n == (tmp_path / "m.safetensors").stat().st_size
    back = load_model(tmp_path / "m.safetensors")
    assert all(torch.equal(state[k], back[k]) for k in state)


def test_checkpoint_round_trip_and_corruption(tmp_path):
    ck = Checkpoint(round=3, model={"w": torch.ones(2)}, strategy_state={"m": torch.zeros(2)},
                    history=[{"round": 1}], config={"seed": 1})
    save_checkpoint(tmp_path, ck)
    back = load_checkpoint(tmp_path)
    assert back is not None and back.round == 3 and back.history == [{"round": 1}]
    assert torch.equal(back.model["w"], torch.ones(2)) and "m" in back.strategy_state
    assert load_checkpoint(tmp_path / "nothing") is None
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_written_files_are_readable_like_any_new_file(tmp_path):
    """mkstemp makes 0600 temp files; results must be readable as open() would make them."""
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_zero_copy_safetensors_load_back_exactly(tmp_path) -> None:
    """save_model writes the header then each tensor's own memory: safetensors reads it."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fedslim.server.storage import save_model

    state = {"w": torch.randn(3, 4), "step": torch.tensor(5), "empty": torch.zeros(0, 3),
             "half": torch.randn(7).half(), "brain": torch.randn(5).to(torch.bfloat16),
             "strided": torch.randn(4, 6).t(), "mask": torch.tensor([True, False]),
             "f64": torch.randn(2, dtype=torch.float64), "i8": torch.tensor([-1, 2],
                                                                            dtype=torch.int8)}
    path = tmp_path / "m.safetensors"
    size = save_model(path, state, {"round": "3", "note": "é"}, durable=False)
    assert size == path.stat().st_size
    got = load_file(str(path))
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v.contiguous()), k
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"round": "3", "note": "é"}
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0  # the data section starts 8-byte aligned


def test_overwrite_model_rewrites_in_place_and_truncates(tmp_path):
    from safetensors.torch import load_file

    from fedslim.server.storage import overwrite_model

    path = tmp_path / "slot.safetensors"
    big = {"w": torch.randn(300, 20), "b": torch.randn(20)}
    small = {"w": torch.randn(3, 2)}
    overwrite_model(path, big, {"token": "1"})
    inode = path.stat().st_ino
    overwrite_model(path, small, {"token": "22"})  # shorter: the tail must go
    assert path.stat().st_ino == inode  # the same file, written into
    back = load_file(str(path))
    assert back.keys() == small.keys() and torch.equal(back["w"], small["w"])
    overwrite_model(path, big, {"token": "3"})
    back = load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in big.items())
