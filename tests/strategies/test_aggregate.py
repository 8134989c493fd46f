"""Aggregation as pure functions, checked against a float64 numpy reference."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.config import ServerOpt
from fedslim.errors import UpdateRejected
from fedslim.strategies.aggregate import (
    ServerOptimizer,
    apply_step,
    float_keys,
    validate_update,
    validate_weight,
    weighted_mean,
)


@settings(max_examples=40, deadline=None)
@given(n_clients=st.integers(1, 6), shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-6, 1.0, 1e4]))
def test_weighted_mean_matches_float64_reference(n_clients, shape, seed, scale):
    rng = np.random.default_rng(seed)
    ups = [{"w": np.asarray(rng.standard_normal(shape) * scale, dtype=np.float32),
            "b": rng.standard_normal(3).astype(np.float32)} for _ in range(n_clients)]
    weights = rng.integers(1, 500, n_clients).astype(float)
    got = weighted_mean([{k: torch.from_numpy(v) for k, v in u.items()} for u in ups], weights)
    for k in ("w", "b"):
        pairs = zip(ups, weights, strict=True)
        ref = sum(w * u[k].astype(np.float64) for u, w in pairs) / weights.sum()
        assert got[k].dtype == torch.float32
        np.testing.assert_allclose(got[k].numpy(), ref.astype(np.float32), rtol=1e-6,
                                   atol=1e-6 * scale)


def test_weighted_mean_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        weighted_mean([], [])
    with pytest.raises(ValueError):
        weighted_mean([{"a": torch.zeros(1)}], [0.0])


def test_server_optimizers():
    u = {"w": torch.tensor([1.0, -2.0])}
    avg = ServerOptimizer(ServerOpt.AVG, lr=0.5)
    assert torch.equal(avg.step(u)["w"], torch.tensor([0.5, -1.0]))
    mom = ServerOptimizer(ServerOpt.AVGM, lr=1.0, beta1=0.9)
    mom.step(u)
    torch.testing.assert_close(mom.step(u)["w"], torch.tensor([1.9, -3.8]))
    adam = ServerOptimizer(ServerOpt.ADAM, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    step = adam.step(u)["w"]
    m = 0.1 * u["w"]
    v = 0.01 * u["w"] ** 2
    torch.testing.assert_close(step, 0.1 * m / (v.sqrt() + 1e-3))
    clone = ServerOptimizer(ServerOpt.ADAM, lr=0.1)
    clone.load_state_dict(adam.state_dict())
    torch.testing.assert_close(clone.step(u)["w"], adam.step(u)["w"])


def test_apply_step_leaves_integer_buffers_alone():
    g = {"w": torch.ones(2), "n": torch.tensor(5)}
    assert float_keys(g) == ["w"]
    out = apply_step(g, {"w": torch.tensor([1.0, 2.0])})
    assert torch.equal(out["w"], torch.tensor([2.0, 3.0])) and out["n"].item() == 5


@pytest.mark.parametrize("update,fragment", [
    ({"w": torch.zeros(2)}, "names differ"),
    ({"w": torch.zeros(2), "b": torch.zeros(3), "x": torch.zeros(1)}, "names differ"),
    ({"w": torch.zeros(3), "b": torch.zeros(3)}, "shape"),
    ({"w": torch.tensor([0.0, float("nan")]), "b": torch.zeros(3)}, "NaN"),
    ({"w": torch.tensor([0.0, float("inf")]), "b": torch.zeros(3)}, "NaN or Inf"),
    ({"w": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(3)}, "dtype"),
])
def test_validate_update_rejects_with_reason(update, fragment):
    with pytest.raises(UpdateRejected) as err:
        validate_update(update, {"w": (2,), "b": (3,)}, "node 7")
    assert "node 7" in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("w", [0, -1, float("nan"), float("inf"), "10", True])
def test_validate_weight(w):
    with pytest.raises(UpdateRejected, match="num-examples"):
        validate_weight(w, "node 1")
    assert validate_weight(12, "x") == 12.0
