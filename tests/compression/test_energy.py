"""``energy:E``: the fewest largest magnitudes holding a fraction E of the update's energy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.compression import decode_update, encode_update, parse_spec
from fedslim.compression.fidelity import SORT_BELOW, energy_count, select_energy
from fedslim.errors import SpecError


def reference_count(values: np.ndarray, fraction: float) -> tuple[int, float, float]:
    """(k, energy of the k largest, total energy) in float64, the definition itself."""
    sq = np.sort(values.astype(np.float64) ** 2)[::-1]
    cum = np.cumsum(sq)
    total = float(cum[-1]) if cum.size else 0.0
    if total == 0.0:
        return 0, 0.0, 0.0
    k = int(np.searchsorted(cum, fraction * total)) + 1
    k = min(k, int(np.count_nonzero(sq)))
    return k, float(cum[k - 1]), total


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), fraction=st.floats(0.01, 1.0),
       kind=st.sampled_from(["normal", "heavy", "ties", "sparse", "zeros"]),
       seed=st.integers(0, 2**31))
def test_count_is_the_shortest_prefix_reaching_the_fraction(n: int, fraction: float,
                                                             kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = {"normal": rng.standard_normal(n), "heavy": rng.standard_t(1.5, n),
         "ties": rng.integers(-2, 3, n).astype(float),
         "sparse": rng.standard_normal(n) * (rng.random(n) < 0.03),
         "zeros": np.zeros(n)}[kind].astype(np.float32)
    k = energy_count([torch.from_numpy(x)], fraction)
    ref_k, _, total = reference_count(x, fraction)
    if total == 0.0:
        assert k == 0
        return
    sq = np.sort(x.astype(np.float64) ** 2)[::-1]
    # the total is summed in float32 rows (relative error ~1e-6): k may sit one or two
    # values from the float64 reference only where the prefix energy is that close to it
    assert sq[:k].sum() >= fraction * total * (1 - 1e-5)
    assert k == 1 or sq[:k - 1].sum() < fraction * total * (1 + 1e-5)
    assert abs(k - ref_k) <= 2


@pytest.mark.parametrize("n", [SORT_BELOW + 1, 3 * SORT_BELOW])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_sampled_candidates_give_the_exact_count_on_large_groups(n: int, fraction: float
                                                                ) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * rng.random(n) ** 4).astype(np.float32)
    parts = [torch.from_numpy(x[: n // 3]), torch.from_numpy(x[n // 3:])]
    k = energy_count(parts, fraction, torch.Generator().manual_seed(1))
    ref_k, _, _ = reference_count(x, fraction)
    assert abs(k - ref_k) <= 2
    # the sample only narrows the candidates: another seed gives the same count
    assert energy_count(parts, fraction, torch.Generator().manual_seed(2)) == k


def test_per_tensor_scope_keeps_the_fraction_of_every_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(5000, generator=g) * 100.0   # dominates the global energy
    small = torch.randn(400, generator=g)

    def kept(scope: str) -> list[tuple[float, float]]:
        cfg = parse_spec(f"energy:0.5,scope={scope}|pass:0").topk
        assert cfg is not None
        idx = select_energy([big, small], cfg)
        return [(float((t[i] ** 2).sum()), float((t ** 2).sum()))
                for t, i in zip([big, small], idx, strict=True)]

    per_tensor = kept("tensor")
    assert all(k >= 0.5 * total * (1 - 1e-6) for k, total in per_tensor)
    whole = kept("global")
    assert sum(k for k, _ in whole) >= 0.5 * sum(t for _, t in whole) * (1 - 1e-6)
    assert whole[1][0] == 0.0  # the small tensor is starved by the global threshold


def test_round_trip_keeps_the_energy_and_sends_nothing_for_a_zero_tensor() -> None:
    g = torch.Generator().manual_seed(3)
    update = {"w": torch.randn(64, 32, generator=g) ** 3, "frozen": torch.zeros(300),
              "b": torch.randn(10, generator=g)}
    spec = parse_spec("energy:0.7|q:8|ans|pass:0")
    payload, sent = encode_update(update, spec, return_reconstruction=True,
                                  schema_bound=True, spec_implied=True)
    decoded = decode_update(payload, expected_spec=spec,
                            schema={k: tuple(v.shape) for k, v in update.items()})
    assert decoded.kept["frozen"] == 0 and not decoded.tensors["frozen"].any()
    for name in ("w", "b"):
        assert torch.equal(decoded.tensors[name], sent[name])
        kept = float((update[name].reshape(-1)[sent[name].reshape(-1) != 0] ** 2).sum())
        assert kept >= 0.7 * float((update[name] ** 2).sum()) * (1 - 1e-5)


@pytest.mark.parametrize(("text", "canonical"), [
    ("energy:0.6", "energy:0.6"), ("energy:60%", "energy:0.6"),
    ("energy:0.25,scope=global|q:4|ans|pass:0", "energy:0.25,scope=global|q:4|ans|pass:0"),
    ("energy:1|fp16", "energy:1.0|fp16"),
    ("energy:0.5,floor=0.25,scope=global|q:2|ans|pass:0",
     "energy:0.5,scope=global,floor=0.25|q:2|ans|pass:0")])
def test_spec_forms_are_canonical(text: str, canonical: str) -> None:
    spec = parse_spec(text)
    assert str(spec) == canonical and parse_spec(canonical) == spec
    assert spec.topk is not None and spec.topk.is_adaptive and spec.at_round(1, 4) == spec


@pytest.mark.parametrize("bad", ["energy", "energy:0", "energy:1.5", "energy:-0.1",
                                 "energy:0.5,mode=sampled", "energy:0.5|topk:0.1",
                                 "energy:0.5,k=3", "energy:x"])
def test_bad_energy_specs_are_one_spec_error(bad: str) -> None:
    with pytest.raises(SpecError, match="invalid compression spec"):
        parse_spec(bad)


def test_a_floor_keeps_every_tensor_moving_under_a_global_selection() -> None:
    g = torch.Generator().manual_seed(5)
    big = torch.randn(20_000, generator=g) * 50.0
    small = torch.randn(300, generator=g)
    flats = [big, small]
    plain = parse_spec("energy:0.5,scope=global|pass:0").topk
    floored = parse_spec("energy:0.5,scope=global,floor=0.3|pass:0").topk
    assert plain is not None and floored is not None
    without, with_floor = select_energy(flats, plain), select_energy(flats, floored)
    assert without[1].numel() == 0                    # starved without the floor
    assert torch.equal(with_floor[0], without[0])     # the big tensor's share is unchanged
    kept = float((small[with_floor[1]] ** 2).sum())
    assert kept >= 0.3 * float((small ** 2).sum()) * (1 - 1e-6)
    # the floor adds the fewest values: one less would be under it
    ordered = torch.sort(small.abs(), descending=True).values
    assert float((ordered[:with_floor[1].numel() - 1] ** 2).sum()) < 0.3 * float(
        (small ** 2).sum())


@pytest.mark.parametrize("bad", ["energy:0.5,floor=0.2", "energy:0.3,scope=global,floor=0.5",
                                 "topk:0.1,floor=0.1", "energy:0.5,scope=global,floor=-1"])
def test_floor_needs_a_global_energy_above_it(bad: str) -> None:
    with pytest.raises(SpecError, match="invalid compression spec"):
        parse_spec(bad)
