import gzip
import struct

import numpy as np
import pytest

from fedslim.config import parse_run_config
from fedslim.errors import DataError
from fedslim.task.data import client_data, load_splits, partition_indices, split_pool
from fedslim.task.datasets import (
    load_cifar10_pool,
    load_digits_pool,
    load_mnist_pool,
    make_synthetic,
    read_idx,
)


def _cfg(**kw):
    return parse_run_config(kw).data


def test_digits_splits_are_deterministic_disjoint_and_cover():
    cfg = _cfg()
    a, b = load_splits(cfg, 7), split_pool(load_digits_pool(), cfg, 7)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    total = len(a.clients) + len(a.val) + len(a.test) + len(a.proxy_x)
    assert total == 1797
    rows = np.concatenate([a.clients.x, a.val.x, a.test.x, a.proxy_x]).reshape(total, -1)
    # every image appears exactly as often as in the pool (digits has a few duplicates)
    pool = b.clients.x.shape[1:]
    assert pool == (1, 8, 8)
    assert len(np.unique(rows, axis=0)) == len(np.unique(
        __import__("sklearn.datasets", fromlist=["x"]).load_digits().data, axis=0))
    other = load_splits(cfg, 8)
    assert not np.array_equal(a.test.y, other.test.y)


def test_proxy_set_carries_no_labels():
    splits = load_splits(_cfg(), 0)
    assert isinstance(splits.proxy_x, np.ndarray) and splits.proxy_x.ndim == 4
    assert not hasattr(splits.proxy_x, "y")


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet", "pathological"])
def test_partitions_are_deterministic_disjoint_and_cover(partitioning):
    cfg = _cfg(partitioning=partitioning)
    parts = partition_indices(cfg, 3, 10)
    again = partition_indices.__wrapped__(cfg, 3, 10)
    for p, q in zip(parts, again, strict=True):
        np.testing.assert_array_equal(p, q)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)), "partitions overlap"
    n = len(load_splits(cfg, 3).clients)
    if partitioning != "pathological":  # pathological may leave unassigned classes out
        assert set(allidx.tolist()) == set(range(n)), "partitions do not cover the data"


def _label_share_max(cfg, num=10):
    y = load_splits(cfg, 0).clients.y
    return np.mean([np.bincount(y[p], minlength=10).max() / max(len(p), 1)
                    for p in partition_indices(cfg, 0, num)])


def test_dirichlet_is_really_skewed_and_alpha_controls_it():
    iid = _label_share_max(_cfg(partitioning="iid"))
    skewed = _label_share_max(_cfg(partitioning="dirichlet", **{"dirichlet-alpha": 0.1}))
    mild = _label_share_max(_cfg(partitioning="dirichlet", **{"dirichlet-alpha": 100.0}))
    assert iid < 0.25
    assert skewed > 0.5 > iid
    assert mild < skewed


def test_pathological_gives_k_classes_per_client():
    cfg = _cfg(partitioning="pathological", **{"classes-per-client": 2})
    y = load_splits(cfg, 0).clients.y
    for p in partition_indices(cfg, 0, 10):
        assert len(np.unique(y[p])) <= 2


def test_client_data_splits_train_and_eval():
    cfg = _cfg()
    train, ev = client_data(cfg, 0, 3, 10)
    assert len(train) > 0 and len(ev) >= 0
    assert len(train) + len(ev) == len(partition_indices(cfg, 0, 10)[3])
    with pytest.raises(DataError, match="partition-id"):
        client_data(cfg, 0, 10, 10)


def test_synthetic_is_deterministic_and_learnable_shape():
    a, b = make_synthetic(100, seed=1), make_synthetic(100, seed=1)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.shape == (100, 1, 8, 8) and a.x.dtype == np.float32


def _write_idx(path, arr, gz=False):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_mnist_idx_loader_on_tiny_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (n, 28, 28)), gz=True)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    pool = load_mnist_pool(tmp_path)
    assert pool.x.shape == (10, 1, 28, 28) and pool.x.max() <= 1.0
    assert len(pool.y) == 10


def test_mnist_rejects_truncated_and_bad_magic(tmp_path):
    _write_idx(tmp_path / "x", np.zeros((3, 4, 4)))
    raw = (tmp_path / "x").read_bytes()
    (tmp_path / "trunc").write_bytes(raw[:-1])
    with pytest.raises(DataError, match="header says"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(DataError, match="IDX"):
        read_idx(tmp_path / "magic")
    with pytest.raises(DataError, match="missing"):
        load_mnist_pool(tmp_path)


def test_cifar_binary_loader_on_tiny_files(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1.bin", 3), ("test_batch.bin", 2)):
        rec = rng.integers(0, 256, (n, 3073)).astype(np.uint8)
        rec[:, 0] = rng.integers(0, 10, n)
        (tmp_path / name).write_bytes(rec.tobytes())
    pool = load_cifar10_pool(tmp_path)
    assert pool.x.shape == (5, 3, 32, 32)
    (tmp_path / "data_batch_2.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="multiple of 3073"):
        load_cifar10_pool(tmp_path)
    with pytest.raises(DataError, match="no CIFAR-10"):
        load_cifar10_pool(tmp_path / "missing")


def test_mnist_dataset_through_config(tmp_path):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 60), ("t10k", 40)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    cfg = _cfg(dataset="mnist", partitioning="iid", **{"data-dir": str(tmp_path)})
    train, _ = client_data(cfg, 0, 0, 2)
    assert train.x.shape[1:] == (1, 28, 28)
